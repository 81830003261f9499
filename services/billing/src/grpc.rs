//! The tonic `BillingService`: each handler parses its request into domain values (reporting
//! every bad field at once as INVALID_ARGUMENT), checks that an end user touches only their own
//! account and payments, calls the store, and encodes the result. No billing rule lives here;
//! who may call which method at all is the mesh's authorization layer's business (see
//! `config::default_policy`).

use mesh::{
    authz::require_owner, pagination::Page, status::FieldViolations, timestamp::from_millis,
};
use meshwork::{
    billing::v1::{self as pb, billing_service_server::BillingService},
    common::v1 as common,
};
use tonic::{Request, Response, Status};

use crate::{
    domain::{
        Account, Charge, CurrencyCode, IdempotencyKey, Money, Payment, PaymentId, PaymentKind,
        Refund, TopUp, UserId,
    },
    store::{Receipt, Store},
};

/// The gRPC face of billing.
#[derive(Debug, Clone)]
pub struct BillingGrpc {
    store: Store,
}

impl BillingGrpc {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl BillingService for BillingGrpc {
    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let user_id = parse_alone("user_id", UserId::parse(&request.get_ref().user_id))?;
        require_owner(&request, user_id.as_str())?;
        let account = self.store.account(&user_id).await?;
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(encode_account(&account)),
        }))
    }

    async fn top_up(
        &self,
        request: Request<pb::TopUpRequest>,
    ) -> Result<Response<pb::TopUpResponse>, Status> {
        let top_up = decode_top_up(request.get_ref())?;
        require_owner(&request, top_up.user_id.as_str())?;
        let Receipt { payment, account } = self.store.top_up(&top_up).await?;
        Ok(Response::new(pb::TopUpResponse {
            payment: Some(encode_payment(payment)),
            account: Some(encode_account(&account)),
        }))
    }

    async fn charge(
        &self,
        request: Request<pb::ChargeRequest>,
    ) -> Result<Response<pb::ChargeResponse>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let user_id = violations.check("user_id", UserId::parse(&request.user_id));
        let amount = required_money("amount", request.amount.as_ref(), &mut violations);
        let key = parse_key(&request.idempotency_key, &mut violations);
        let charge = match (user_id, amount, key) {
            (Some(user_id), Some(amount), Some(idempotency_key)) => Charge {
                user_id,
                amount,
                idempotency_key,
                reference: request.reference,
            },
            _ => return Err(violations.into_status()),
        };
        let Receipt { payment, account } = self.store.charge(&charge).await?;
        Ok(Response::new(pb::ChargeResponse {
            payment: Some(encode_payment(payment)),
            account: Some(encode_account(&account)),
        }))
    }

    async fn refund(
        &self,
        request: Request<pb::RefundRequest>,
    ) -> Result<Response<pb::RefundResponse>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let payment_id = violations.check("payment_id", PaymentId::parse(&request.payment_id));
        // Unset means "all that remains"; set, it must be a valid amount.
        let amount = match &request.amount {
            None => Some(None),
            Some(money) => parse_money("amount", money, &mut violations).map(Some),
        };
        let key = parse_key(&request.idempotency_key, &mut violations);
        let refund = match (payment_id, amount, key) {
            (Some(payment_id), Some(amount), Some(idempotency_key)) => Refund {
                payment_id,
                amount,
                idempotency_key,
            },
            _ => return Err(violations.into_status()),
        };
        let Receipt { payment, account } = self.store.refund(&refund).await?;
        Ok(Response::new(pb::RefundResponse {
            payment: Some(encode_payment(payment)),
            account: Some(encode_account(&account)),
        }))
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> Result<Response<pb::GetPaymentResponse>, Status> {
        let id = parse_alone("id", PaymentId::parse(&request.get_ref().id))?;
        // Whose payment it is is only known once it is read.
        let payment = self.store.payment(&id).await?;
        require_owner(&request, payment.user_id.as_str())?;
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(encode_payment(payment)),
        }))
    }

    async fn list_payments(
        &self,
        request: Request<pb::ListPaymentsRequest>,
    ) -> Result<Response<pb::ListPaymentsResponse>, Status> {
        let (user_id, page) = decode_list_payments(request.get_ref())?;
        require_owner(&request, user_id.as_str())?;
        let (payments, next_page_token) = self.store.payments(&user_id, &page).await?;
        Ok(Response::new(pb::ListPaymentsResponse {
            payments: payments.into_iter().map(encode_payment).collect(),
            next_page_token,
        }))
    }
}

fn decode_top_up(request: &pb::TopUpRequest) -> Result<TopUp, Status> {
    let mut violations = FieldViolations::new();
    let user_id = violations.check("user_id", UserId::parse(&request.user_id));
    let amount = required_money("amount", request.amount.as_ref(), &mut violations);
    let key = parse_key(&request.idempotency_key, &mut violations);
    match (user_id, amount, key) {
        (Some(user_id), Some(amount), Some(idempotency_key)) => Ok(TopUp {
            user_id,
            amount,
            idempotency_key,
        }),
        _ => Err(violations.into_status()),
    }
}

fn decode_list_payments(request: &pb::ListPaymentsRequest) -> Result<(UserId, Page), Status> {
    let mut violations = FieldViolations::new();
    let user_id = violations.check("user_id", UserId::parse(&request.user_id));
    let page = Page::parse(request.page_size, &request.page_token, &mut violations);
    // Page::parse records its violations without failing, hence the emptiness check.
    match user_id {
        Some(user_id) if violations.is_empty() => Ok((user_id, page)),
        _ => Err(violations.into_status()),
    }
}

/// A request with a single field: its value, or INVALID_ARGUMENT naming it.
fn parse_alone<T, E: std::fmt::Display>(field: &str, parsed: Result<T, E>) -> Result<T, Status> {
    parsed.map_err(|error| mesh::status::invalid_argument(field, error.to_string()))
}

fn parse_key(raw: &str, violations: &mut FieldViolations) -> Option<IdempotencyKey> {
    violations.check("idempotency_key", IdempotencyKey::parse(raw))
}

fn parse_money(
    field: &str,
    money: &common::Money,
    violations: &mut FieldViolations,
) -> Option<Money> {
    Money::parse(&money.currency_code, money.amount_minor, field, violations)
}

fn required_money(
    field: &str,
    money: Option<&common::Money>,
    violations: &mut FieldViolations,
) -> Option<Money> {
    match money {
        Some(money) => parse_money(field, money, violations),
        None => {
            violations.add(field, "is required");
            None
        }
    }
}

fn encode_money(currency: &CurrencyCode, amount_minor: i64) -> common::Money {
    common::Money {
        currency_code: currency.as_str().to_owned(),
        amount_minor,
    }
}

fn encode_account(account: &Account) -> pb::Account {
    pb::Account {
        user_id: account.user_id.as_str().to_owned(),
        balance: Some(encode_money(&account.currency, account.balance_minor)),
        update_time: Some(from_millis(account.update_ms)),
    }
}

fn encode_payment(payment: Payment) -> pb::Payment {
    let kind = match payment.kind {
        PaymentKind::TopUp => pb::PaymentKind::TopUp,
        PaymentKind::Charge => pb::PaymentKind::Charge,
        PaymentKind::Refund => pb::PaymentKind::Refund,
    };
    pb::Payment {
        id: payment.id.as_str().to_owned(),
        user_id: payment.user_id.as_str().to_owned(),
        kind: kind.into(),
        amount: Some(encode_money(
            payment.amount.currency(),
            payment.amount.amount_minor(),
        )),
        idempotency_key: payment.idempotency_key.as_str().to_owned(),
        refunded_payment_id: payment
            .refunded_payment_id
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        reference: payment.reference,
        create_time: Some(from_millis(payment.create_ms)),
    }
}

#[cfg(test)]
mod tests {
    use mesh::{authz::Caller, identity::SpiffeId};
    use tonic::Code;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// The handlers over a fresh SQLite file in `dir`.
    async fn handlers(dir: &tempfile::TempDir) -> Result<BillingGrpc, Box<dyn std::error::Error>> {
        let database = mesh::store::testing::sqlite(dir.path(), "billing");
        Ok(BillingGrpc::new(Store::open(&database).await?))
    }

    /// `message` as the authorization layer passes it on for end user `user_id`.
    fn as_user<T>(user_id: &str, message: T) -> Result<Request<T>, Box<dyn std::error::Error>> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(Caller::User {
            user_id: user_id.to_owned(),
            via: SpiffeId::new("meshwork.local", "default", "operator")?,
        });
        Ok(request)
    }

    fn top_up_request(user_id: &str, key: &str) -> pb::TopUpRequest {
        pb::TopUpRequest {
            user_id: user_id.to_owned(),
            amount: Some(common::Money {
                currency_code: "EUR".to_owned(),
                amount_minor: 1000,
            }),
            idempotency_key: key.to_owned(),
        }
    }

    fn code<T>(result: Result<T, Status>) -> Option<Code> {
        result.err().map(|status| status.code())
    }

    #[tokio::test]
    async fn an_end_user_reaches_only_their_own_account_and_payments() -> TestResult {
        let dir = tempfile::tempdir()?;
        let billing = handlers(&dir).await?;
        let topped = billing
            .top_up(as_user("ada", top_up_request("ada", "t1"))?)
            .await?
            .into_inner();
        let payment_id = topped.payment.map(|p| p.id).unwrap_or_default();

        let get_account = |user_id: &str| pb::GetAccountRequest {
            user_id: user_id.to_owned(),
        };
        let list = pb::ListPaymentsRequest {
            user_id: "ada".to_owned(),
            ..pb::ListPaymentsRequest::default()
        };
        let get_payment = pb::GetPaymentRequest {
            id: payment_id.clone(),
        };
        assert!(
            billing
                .get_account(as_user("ada", get_account("ada"))?)
                .await
                .is_ok()
        );
        assert!(
            billing
                .list_payments(as_user("ada", list.clone())?)
                .await
                .is_ok()
        );
        assert!(
            billing
                .get_payment(as_user("ada", get_payment.clone())?)
                .await
                .is_ok()
        );

        let denied = Some(Code::PermissionDenied);
        assert_eq!(
            code(
                billing
                    .get_account(as_user("bob", get_account("ada"))?)
                    .await
            ),
            denied
        );
        assert_eq!(
            code(billing.list_payments(as_user("bob", list)?).await),
            denied
        );
        assert_eq!(
            code(billing.get_payment(as_user("bob", get_payment)?).await),
            denied
        );
        let top_up = billing
            .top_up(as_user("bob", top_up_request("ada", "t2"))?)
            .await;
        assert_eq!(code(top_up), denied);

        let account = billing
            .get_account(Request::new(get_account("ada")))
            .await?
            .into_inner()
            .account;
        let balance = account.and_then(|a| a.balance).map(|b| b.amount_minor);
        assert_eq!(balance, Some(1000), "a denied top-up moved money");
        Ok(())
    }

    #[tokio::test]
    async fn an_unknown_payment_is_not_found_for_an_end_user_too() -> TestResult {
        let dir = tempfile::tempdir()?;
        let billing = handlers(&dir).await?;
        let request = pb::GetPaymentRequest {
            id: "no-such-payment".to_owned(),
        };
        let result = billing.get_payment(as_user("ada", request)?).await;
        assert_eq!(code(result), Some(Code::NotFound));
        Ok(())
    }
}
