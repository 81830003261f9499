#!/usr/bin/env python3
"""The user journey against a running mesh, through a Python client generated from proto/.

    python -m grpc_tools.protoc -I proto --python_out=GEN --grpc_python_out=GEN $(find proto -name '*.proto')
    python tests/e2e/journey.py --generated GEN --ca CERTS/ca.crt --cert CERTS/operator.crt --key CERTS/operator.key

Every port speaks mutual TLS only: the client presents the operator's certificate (admitted by
every service) and dials `localhost`, the name the development certificates carry for clients.

register (auth) -> login -> top up 5000 EUR minor units (billing) -> order 2 x 1250 EUR (orders)
-> WatchOrder until PAID -> cancel -> CANCELLED -> balance back to 5000; plus the errors a client
can expect on the way (INVALID_ARGUMENT, ALREADY_EXISTS, UNAUTHENTICATED, NOT_FOUND) and
reflection v1 on every address, and a client without a certificate refused. Stops at the first broken expectation; exits 0 only if all held.
Uses only the generated code and grpcio: no other client code from this repository.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid

import grpc

CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0)]


class Failed(Exception):
    pass


class Journey:
    def __init__(self, args: argparse.Namespace, pb: dict) -> None:
        self.args = args
        self.pb = pb
        self.passed = 0
        self.channels: list[grpc.Channel] = []
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca), private_key=read(args.key), certificate_chain=read(args.cert)
        )

    # ---- helpers ---------------------------------------------------------------------------

    def channel(self, port: int) -> grpc.Channel:
        """A mutual-TLS channel as the operator, connected."""
        target = f"{self.args.host}:{port}"
        channel = grpc.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=self.args.timeout)
        except grpc.FutureTimeoutError:
            raise Failed(f"cannot connect to {target} within {self.args.timeout}s") from None
        self.channels.append(channel)
        return channel

    def ok(self, what: str, condition: bool, detail: object = "") -> None:
        if not condition:
            raise Failed(f"{what}: {detail}")
        self.passed += 1
        print(f"ok   journey: {what}", flush=True)

    def call(self, what: str, method, request):
        """A unary call that must succeed."""
        try:
            return method(request, timeout=self.args.timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise Failed(f"{what}: {error.code().name}: {error.details()}") from None

    def expect_error(self, what: str, code: grpc.StatusCode, method, request) -> grpc.RpcError:
        try:
            response = method(request, timeout=self.args.timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            self.ok(what, error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}")
            return error
        raise Failed(f"{what}: expected {code.name}, the call succeeded: {response}")

    def money(self, amount_minor: int):
        return self.pb["money"].Money(currency_code="EUR", amount_minor=amount_minor)

    def ok_money(self, what: str, money, amount_minor: int) -> None:
        self.ok(
            what,
            money is not None and money.currency_code == "EUR" and money.amount_minor == amount_minor,
            f"expected {amount_minor} EUR, got {fmt(money)}",
        )

    def watch_until(self, orders, order_id: str, wanted: int, *, failing: tuple[int, ...] = ()):
        """Follows WatchOrder until the order has status `wanted`; returns that order."""
        status = self.pb["orders"].OrderStatus
        seen = []
        stream = orders.WatchOrder(
            self.pb["orders"].WatchOrderRequest(id=order_id),
            timeout=self.args.watch_timeout,
            metadata=self.metadata,
        )
        try:
            for message in stream:
                seen.append(status.Name(message.order.status))
                if message.order.id != order_id:
                    raise Failed(f"WatchOrder({order_id}) sent order {message.order.id!r}")
                if message.order.status == wanted:
                    return message.order
                if message.order.status in failing:
                    raise Failed(
                        f"order {order_id} became {status.Name(message.order.status)} "
                        f"({message.order.failure_reason!r}) while waiting for {status.Name(wanted)}"
                    )
        except grpc.RpcError as error:
            raise Failed(
                f"WatchOrder({order_id}) waiting for {status.Name(wanted)}: "
                f"{error.code().name}: {error.details()} (statuses seen: {seen})"
            ) from None
        finally:
            stream.cancel()
        raise Failed(f"WatchOrder({order_id}) ended before {status.Name(wanted)} (statuses seen: {seen})")

    # ---- the journey -----------------------------------------------------------------------

    def reflection_v1(self) -> None:
        # grpcurl 1.8 speaks only reflection v1alpha; ask v1 by hand. Request: list_services
        # (field 7, a string) = "*"; the response lists the service names as plain strings.
        request = b"\x3a\x01*"
        for port, service in self.args.services:
            channel = self.channel(port)
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=None,
                response_deserializer=None,
            )
            try:
                responses = list(info(iter([request]), timeout=self.args.timeout))
            except grpc.RpcError as error:
                raise Failed(f"reflection v1 on :{port}: {error.code().name}: {error.details()}") from None
            body = b"".join(responses)
            self.ok(
                f"reflection v1 on :{port} lists {service} and grpc.health.v1.Health",
                service.encode() in body and b"grpc.health.v1.Health" in body,
                body,
            )

    def refused_without_certificate(self) -> None:
        """TLS that trusts the mesh CA but presents no certificate: the server never serves it."""
        port, service = self.args.services[0]
        channel = grpc.secure_channel(
            f"{self.args.host}:{port}",
            grpc.ssl_channel_credentials(root_certificates=read(self.args.ca)),
            options=CHANNEL_OPTIONS,
        )
        self.channels.append(channel)
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None
        )
        try:
            response = check(b"", timeout=self.args.timeout)
        except grpc.RpcError as error:
            self.ok(
                f"a client without a certificate is refused by :{port} ({error.code().name})",
                error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED),
                f"expected UNAVAILABLE, got {error.code().name}: {error.details()}",
            )
            return
        raise Failed(f"a client without a certificate got an answer from {service} on :{port}: {response!r}")

    def run(self) -> None:
        a, p = self.args, self.pb
        auth_pb, users_pb, billing_pb, orders_pb = p["auth"], p["users"], p["billing"], p["orders"]
        status = orders_pb.OrderStatus
        auth = p["auth_grpc"].AuthServiceStub(self.channel(a.auth))
        users = p["users_grpc"].UserServiceStub(self.channel(a.users_replica))
        billing = p["billing_grpc"].BillingServiceStub(self.channel(a.billing))
        orders = p["orders_grpc"].OrderServiceStub(self.channel(a.orders))

        self.reflection_v1()
        self.refused_without_certificate()

        run_id = uuid.uuid4().hex[:12]
        email = f"journey-{run_id}@example.com"
        password = f"correct horse {run_id}"

        # Register: a bad email is the client's mistake, with the field named in the details.
        error = self.expect_error(
            "register with an invalid email: INVALID_ARGUMENT",
            grpc.StatusCode.INVALID_ARGUMENT,
            auth.Register,
            auth_pb.RegisterRequest(email="not-an-email", password=password, display_name="Nobody"),
        )
        details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
        self.ok(
            "INVALID_ARGUMENT carries google.rpc details naming the email field",
            b"email" in details,
            f"grpc-status-details-bin = {details!r}",
        )

        registered = self.call(
            "register",
            auth.Register,
            auth_pb.RegisterRequest(email=email, password=password, display_name="Journey"),
        )
        user_id = registered.user_id
        self.ok("register returns a user id", bool(user_id), registered)

        self.expect_error(
            "register the same email again: ALREADY_EXISTS",
            grpc.StatusCode.ALREADY_EXISTS,
            auth.Register,
            auth_pb.RegisterRequest(email=email, password=password, display_name="Again"),
        )

        user = self.call("users GetUser", users.GetUser, users_pb.GetUserRequest(id=user_id)).user
        self.ok(
            "auth created the user in users (read on the second replica)",
            user.id == user_id and user.email == email and user.display_name == "Journey",
            user,
        )

        # Login.
        self.expect_error(
            "login with a wrong password: UNAUTHENTICATED",
            grpc.StatusCode.UNAUTHENTICATED,
            auth.Login,
            auth_pb.LoginRequest(email=email, password=password + "!"),
        )
        login = self.call("login", auth.Login, auth_pb.LoginRequest(email=email, password=password))
        tokens = login.tokens
        self.ok(
            "login returns the user id and a Bearer token pair",
            login.user_id == user_id
            and tokens.token_type == "Bearer"
            and tokens.access_token.count(".") == 2
            and bool(tokens.refresh_token)
            and tokens.expires_in_seconds > 0,
            login,
        )
        header = json.loads(b64url(tokens.access_token.split(".")[0]))
        jwks = self.call("auth GetJwks", auth.GetJwks, auth_pb.GetJwksRequest())
        kids = {key.kid for key in jwks.keys if key.kty == "OKP" and key.crv == "Ed25519"}
        self.ok(
            "the access token is EdDSA, signed with a key that GetJwks publishes",
            header.get("alg") == "EdDSA" and header.get("kid") in kids,
            f"header {header}, JWKS kids {sorted(kids)}",
        )
        # From here on every call carries the user's token: where a method admits end users, a
        # token narrows the call to its user (even over the operator's certificate), so the rest
        # of the journey is the user acting on their own data.
        self.metadata = (("authorization", f"Bearer {tokens.access_token}"),)
        self.expect_error(
            "with the user's token, another user's account: PERMISSION_DENIED",
            grpc.StatusCode.PERMISSION_DENIED,
            billing.GetAccount,
            billing_pb.GetAccountRequest(user_id=f"someone-else-{run_id}"),
        )
        forged = tokens.access_token[:-4] + ("AAAA" if not tokens.access_token.endswith("AAAA") else "BBBB")
        self.metadata = (("authorization", f"Bearer {forged}"),)
        self.expect_error(
            "with a forged token: UNAUTHENTICATED",
            grpc.StatusCode.UNAUTHENTICATED,
            billing.GetAccount,
            billing_pb.GetAccountRequest(user_id=user_id),
        )
        self.metadata = (("authorization", f"Bearer {tokens.access_token}"),)

        # Top up 5000 EUR minor units (twice with one key: money moves once).
        self.expect_error(
            "no account before the first top-up: NOT_FOUND",
            grpc.StatusCode.NOT_FOUND,
            billing.GetAccount,
            billing_pb.GetAccountRequest(user_id=user_id),
        )
        topup_request = billing_pb.TopUpRequest(
            user_id=user_id, amount=self.money(5000), idempotency_key=f"journey-topup-{run_id}"
        )
        topup = self.call("top up", billing.TopUp, topup_request)
        self.ok_money("top up: balance 5000 EUR", topup.account.balance, 5000)
        self.ok(
            "top up: a TOP_UP payment of 5000 EUR",
            topup.payment.kind == billing_pb.PAYMENT_KIND_TOP_UP
            and topup.payment.amount.amount_minor == 5000
            and bool(topup.payment.id),
            topup.payment,
        )
        again = self.call("top up again with the same key", billing.TopUp, topup_request)
        self.ok(
            "top up with the same idempotency key: the same payment, balance still 5000",
            again.payment.id == topup.payment.id and again.account.balance.amount_minor == 5000,
            again,
        )

        # Order 2 x 1250 EUR.
        created = self.call(
            "create order",
            orders.CreateOrder,
            orders_pb.CreateOrderRequest(
                user_id=user_id,
                items=[orders_pb.OrderItem(sku="e2e-book", quantity=2, unit_price=self.money(1250))],
                idempotency_key=f"journey-order-{run_id}",
            ),
        ).order
        self.ok(
            "create order: an id, the user, PENDING or PAID",
            bool(created.id)
            and created.user_id == user_id
            and created.status in (status.ORDER_STATUS_PENDING, status.ORDER_STATUS_PAID),
            created,
        )
        self.ok_money("create order: total 2 x 1250 = 2500 EUR", created.total, 2500)

        paid = self.watch_until(
            orders, created.id, status.ORDER_STATUS_PAID, failing=(status.ORDER_STATUS_PAYMENT_FAILED,)
        )
        self.ok("WatchOrder: PAID, with the charge's payment id", bool(paid.payment_id), paid)
        account = self.call("get account", billing.GetAccount, billing_pb.GetAccountRequest(user_id=user_id))
        self.ok_money("after the order: balance 2500 EUR", account.account.balance, 2500)

        # Cancel: refunded, CANCELLED, the balance is whole again.
        cancelled = self.call("cancel order", orders.CancelOrder, orders_pb.CancelOrderRequest(id=created.id)).order
        self.ok(
            "cancel order: the same order, PAID or CANCELLED",
            cancelled.id == created.id
            and cancelled.status in (status.ORDER_STATUS_PAID, status.ORDER_STATUS_CANCELLED),
            cancelled,
        )
        self.watch_until(orders, created.id, status.ORDER_STATUS_CANCELLED)
        self.ok("WatchOrder: CANCELLED", True)
        got = self.call("get order", orders.GetOrder, orders_pb.GetOrderRequest(id=created.id)).order
        self.ok("GetOrder: CANCELLED", got.status == status.ORDER_STATUS_CANCELLED, got)
        account = self.call("get account", billing.GetAccount, billing_pb.GetAccountRequest(user_id=user_id))
        self.ok_money("after the cancel: balance back to 5000 EUR", account.account.balance, 5000)

        listed = self.call("list orders", orders.ListOrders, orders_pb.ListOrdersRequest(user_id=user_id))
        self.ok(
            "ListOrders: the one order, CANCELLED",
            [(o.id, o.status) for o in listed.orders] == [(created.id, status.ORDER_STATUS_CANCELLED)],
            listed,
        )

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


def read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def fmt(money) -> str:
    return "nothing" if money is None else f"{money.amount_minor} {money.currency_code!r}"


def load_generated(folder: str) -> dict:
    sys.path.insert(0, folder)
    try:
        from meshwork.auth.v1 import auth_pb2, auth_pb2_grpc
        from meshwork.billing.v1 import billing_pb2, billing_pb2_grpc
        from meshwork.common.v1 import money_pb2
        from meshwork.orders.v1 import orders_pb2, orders_pb2_grpc
        from meshwork.users.v1 import users_pb2, users_pb2_grpc
    except ImportError as error:
        raise SystemExit(f"journey: the generated client in {folder} does not import: {error}")
    return {
        "auth": auth_pb2,
        "auth_grpc": auth_pb2_grpc,
        "billing": billing_pb2,
        "billing_grpc": billing_pb2_grpc,
        "money": money_pb2,
        "orders": orders_pb2,
        "orders_grpc": orders_pb2_grpc,
        "users": users_pb2,
        "users_grpc": users_pb2_grpc,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generated", required=True, help="grpc_tools.protoc's output folder")
    parser.add_argument("--host", default="localhost", help="a name the services' certificates carry")
    parser.add_argument("--ca", required=True, help="the mesh CA certificate (PEM)")
    parser.add_argument("--cert", required=True, help="the operator's certificate (PEM)")
    parser.add_argument("--key", required=True, help="the operator's private key (PEM)")
    parser.add_argument("--users", type=int, default=50051)
    parser.add_argument("--users-replica", type=int, default=50061)
    parser.add_argument("--auth", type=int, default=50052)
    parser.add_argument("--billing", type=int, default=50053)
    parser.add_argument("--orders", type=int, default=50054)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per unary call")
    parser.add_argument("--watch-timeout", type=float, default=30.0, help="seconds WatchOrder may take")
    args = parser.parse_args()
    args.services = [
        (args.users, "meshwork.users.v1.UserService"),
        (args.users_replica, "meshwork.users.v1.UserService"),
        (args.auth, "meshwork.auth.v1.AuthService"),
        (args.billing, "meshwork.billing.v1.BillingService"),
        (args.orders, "meshwork.orders.v1.OrderService"),
    ]

    journey = Journey(args, load_generated(args.generated))
    started = time.monotonic()
    try:
        journey.run()
    except Failed as failure:
        print(f"FAIL journey: {failure}", file=sys.stderr, flush=True)
        print(f"journey: {journey.passed} passed, 1 failed")
        return 1
    finally:
        journey.close()
    print(f"journey: took {time.monotonic() - started:.1f}s")
    print(f"journey: {journey.passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
