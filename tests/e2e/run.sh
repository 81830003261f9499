#!/usr/bin/env bash
# End-to-end test of the local mesh, used the way a person would use it:
#   0. `meshctl certs` writes a fresh development PKI (a CA, the services' and the operator's
#      certificates), and keeps it when run again;
#   1. `meshctl up` on a fresh data directory and that PKI, waiting for its ready line;
#   2. the real grpcurl (reflection only, no .proto files), over mutual TLS as the operator: list,
#      describe, health, one call each; and every port refuses plaintext and clients without a
#      certificate;
#   3. a Python client generated from proto/ by grpcio-tools walks the user journey (journey.py),
#      over mutual TLS as the operator;
#   4. Ctrl-C (SIGINT) to meshctl: it must exit 0 and leave no service behind.
# `make e2e` builds the binaries, installs the tools into .tools/ and passes their paths.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

MESHCTL=${MESHCTL:-$ROOT/target/debug/meshctl}
GRPCURL=${GRPCURL:-$ROOT/.tools/bin/grpcurl}
PYTHON=${PYTHON:-$ROOT/.tools/venv/bin/python}
READY_TIMEOUT=${E2E_READY_TIMEOUT:-120} # seconds until meshctl says every service is SERVING
STOP_TIMEOUT=${E2E_STOP_TIMEOUT:-60}    # seconds meshctl gets to stop after SIGINT
CALL_TIMEOUT=${E2E_CALL_TIMEOUT:-10}    # seconds per grpcurl call
# A refused client is not answered at all: grpcurl retries until its connect timeout. Short, so
# the refusals below add seconds, not minutes.
REFUSED_TIMEOUT=${E2E_REFUSED_TIMEOUT:-2}
READY_LINE='meshwork: all services SERVING'
HOST=127.0.0.1 # where the services listen
NAME=localhost # what clients dial: the name the development certificates carry for them
OPERATOR=operator

# meshctl up's contract: these ports, mutual TLS only (TLS 1.3, a certificate from the mesh CA),
# these services.
PORTS=(50051 50061 50052 50053 50054)
declare -A SERVICE=(
  [50051]=meshwork.users.v1.UserService
  [50061]=meshwork.users.v1.UserService
  [50052]=meshwork.auth.v1.AuthService
  [50053]=meshwork.billing.v1.BillingService
  [50054]=meshwork.orders.v1.OrderService
)
# Every RPC that `describe` must show, and one message (with a field it must show) per service.
declare -A RPCS=(
  [users]="CreateUser GetUser ListUsers UpdateUser DeleteUser"
  [auth]="Register Login Refresh Logout GetJwks"
  [billing]="GetAccount TopUp Charge Refund GetPayment ListPayments"
  [orders]="CreateOrder GetOrder ListOrders CancelOrder WatchOrder"
)
declare -A MESSAGE=(
  [users]=meshwork.users.v1.CreateUserRequest
  [auth]=meshwork.auth.v1.Jwk
  [billing]=meshwork.common.v1.Money
  [orders]=meshwork.orders.v1.Order
)
declare -A MESSAGE_FIELD=(
  [users]='string email = 1;'
  [auth]='string kid = 1;'
  [billing]='int64 amount_minor = 2;'
  [orders]='OrderStatus status = 5;'
)

passed=0
failed=0
tmp=
certs=
tls=() # grpcurl's flags to call as the operator: -cacert, -cert, -key
mesh_pid=
out=
rc=0

say() { printf 'e2e: %s\n' "$*"; }

pass() {
  passed=$((passed + 1))
  printf 'ok   %s\n' "$*"
}

# Fails the run at the first broken expectation; the EXIT trap cleans up and prints the summary.
fail() {
  failed=$((failed + 1))
  printf 'FAIL %b\n' "$*" >&2
  exit 1
}

show_log() {
  if [[ -n $tmp && -s $tmp/meshctl.log ]]; then
    echo "---- meshctl log (last 200 lines) ----" >&2
    tail -n 200 "$tmp/meshctl.log" >&2
    echo "---- end of meshctl log ----" >&2
  fi
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Processes started for this run: the services get their database URL, which names our
# temporary data directory, in their environment.
leftovers() {
  [[ -n $tmp ]] || return 0
  local p
  for p in /proc/[0-9]*; do
    [[ ${p#/proc/} != "$$" ]] || continue
    if grep -qaF -- "$tmp/data" "$p/environ" 2>/dev/null; then
      echo "${p#/proc/}"
    fi
  done
}

cleanup() {
  local status=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $mesh_pid ]] && kill -0 "$mesh_pid" 2>/dev/null; then
    kill -INT "$mesh_pid" 2>/dev/null
    for _ in $(seq 1 40); do
      kill -0 "$mesh_pid" 2>/dev/null || break
      sleep 0.5
    done
    # meshctl runs in its own process group (set -m below): take the group down with it.
    kill -KILL -- "-$mesh_pid" 2>/dev/null
    wait "$mesh_pid" 2>/dev/null
  fi
  local pids=()
  mapfile -t pids < <(leftovers)
  if ((${#pids[@]} > 0)); then
    echo "e2e: killing processes left from this run: ${pids[*]}" >&2
    kill -KILL "${pids[@]}" 2>/dev/null
  fi
  if ((status != 0)); then
    show_log
    ((failed > 0)) || failed=1
  fi
  [[ -z $tmp ]] || rm -rf "$tmp"
  echo "e2e: $passed passed, $failed failed"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs grpcurl with only the flags given; leaves its combined output in $out, its exit code in $rc.
grpcurl_bare() {
  set +e
  out=$("$GRPCURL" -connect-timeout 5 -max-time "$CALL_TIMEOUT" "$@" 2>&1)
  rc=$?
  set -e
}

# Runs grpcurl as the operator (mutual TLS with the operator's certificate).
grpcurl_() { grpcurl_bare "${tls[@]}" "$@"; }

# expect DESCRIPTION REGEX...: the last call succeeded and its output matches every regex.
expect() {
  local what=$1 re
  shift
  ((rc == 0)) || fail "$what: grpcurl exited $rc:\n$out"
  for re in "$@"; do
    grep -Eq -- "$re" <<<"$out" || fail "$what: output does not match /$re/:\n$out"
  done
  pass "$what"
}

# expect_code DESCRIPTION CODE: the last call failed with that gRPC status code (grpcurl's name).
expect_code() {
  ((rc != 0)) || fail "$1: expected $2, the call succeeded:\n$out"
  grep -Eq "^ *Code: $2\$" <<<"$out" || fail "$1: expected Code: $2:\n$out"
  pass "$1"
}

# expect_refused DESCRIPTION: the last call never reached gRPC: the connection was refused.
expect_refused() {
  ((rc != 0)) || fail "$1: expected the connection to be refused, the call succeeded:\n$out"
  grep -q '^Failed to dial target host' <<<"$out" || fail "$1: expected 'Failed to dial target host':\n$out"
  pass "$1"
}

json_field() { # PYTHON-EXPRESSION over the JSON in $out, e.g. 'd["user"]["id"]'
  "$PYTHON" -c "import json, sys; d = json.load(sys.stdin); print($1)" <<<"$out"
}

# shellcheck disable=SC2001,SC2016 # a regex-quoting sed, on purpose in single quotes
re_quote() { sed 's/[.[\*^$()+?{|]/\\&/g' <<<"$1"; }

# ---- preconditions --------------------------------------------------------------------------

for tool in "$MESHCTL" "$GRPCURL" "$PYTHON"; do
  [[ -x $tool ]] || fail "$tool is missing: run \`make e2e\` (it builds and installs what this needs)"
done
"$GRPCURL" -version 2>&1 | grep -q '^grpcurl v1\.8\.' || fail "$GRPCURL is not grpcurl 1.8.x"
for port in "${PORTS[@]}"; do
  ! port_open "$port" || fail "port $port is already in use (another \`meshctl up\`?): stop it first"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/meshwork-e2e.XXXXXX")
certs=$tmp/certs
tls=(-cacert "$certs/ca.crt" -cert "$certs/$OPERATOR.crt" -key "$certs/$OPERATOR.key")

# ---- 0. meshctl certs -----------------------------------------------------------------------

names=(users auth billing orders "$OPERATOR")
out=$("$MESHCTL" certs --dir "$certs" 2>&1) || fail "meshctl certs --dir $certs failed:\n$out"
for name in "${names[@]}"; do
  [[ -s $certs/$name.crt && -s $certs/$name.key ]] || fail "meshctl certs wrote no $name.crt/$name.key:\n$out"
  grep -qF -- "spiffe://meshwork.local/ns/default/sa/$name" <<<"$out" ||
    fail "meshctl certs did not name $name's identity:\n$out"
  [[ $(stat -c %a "$certs/$name.key") == 600 ]] || fail "$certs/$name.key is readable by others"
done
[[ -s $certs/ca.crt && -s $certs/ca.key ]] || fail "meshctl certs wrote no CA:\n$out"
grep -qF -- "grpcurl ${tls[*]} $NAME:" <<<"$out" || fail "meshctl certs printed no grpcurl command with the operator's files:\n$out"
pass "meshctl certs: a CA and certificates for ${names[*]}"
ca_before=$(cat "$certs/ca.crt")
out=$("$MESHCTL" certs --dir "$certs" 2>&1) || fail "meshctl certs run again failed:\n$out"
if [[ $(cat "$certs/ca.crt") != "$ca_before" ]] || grep -q '^wrote' <<<"$out"; then
  fail "meshctl certs run again replaced files:\n$out"
fi
pass "meshctl certs run again keeps the CA and every certificate"

# ---- 1. meshctl up --------------------------------------------------------------------------

say "starting $MESHCTL up --data-dir $tmp/data --certs-dir $certs (log: $tmp/meshctl.log)"
# Job control on for this one command: meshctl gets its own process group and, unlike a plain
# background job of a script, does not start with SIGINT ignored.
set -m
"$MESHCTL" up --data-dir "$tmp/data" --certs-dir "$certs" </dev/null >"$tmp/meshctl.log" 2>&1 &
mesh_pid=$!
set +m

deadline=$((SECONDS + READY_TIMEOUT))
until grep -qsF -- "$READY_LINE" "$tmp/meshctl.log"; do
  if ! kill -0 "$mesh_pid" 2>/dev/null; then
    mesh_status=0
    wait "$mesh_pid" || mesh_status=$?
    mesh_pid=
    fail "meshctl up exited (status $mesh_status) before printing '$READY_LINE'"
  fi
  ((SECONDS < deadline)) || fail "no '$READY_LINE' from meshctl up within ${READY_TIMEOUT}s"
  sleep 0.5
done
pass "meshctl up: '$READY_LINE' after $((SECONDS - deadline + READY_TIMEOUT))s"
for port in "${PORTS[@]}"; do
  grep -qF -- "grpcurl ${tls[*]} $NAME:$port list" "$tmp/meshctl.log" ||
    fail "meshctl up printed no grpcurl command as the operator for $NAME:$port"
done
pass "meshctl up printed grpcurl commands (mutual TLS as the operator) for every address"
# The printed commands are meant to be copied: run one word for word (its paths have no spaces).
read -r -a printed < <(grep -m1 -F -- "grpcurl ${tls[*]} $NAME:50052 list" "$tmp/meshctl.log")
grpcurl_bare "${printed[@]:1}"
expect "the printed command works: ${printed[*]}" '^meshwork\.auth\.v1\.AuthService$'

# ---- 2. grpcurl, through reflection only ----------------------------------------------------

# Mutual TLS only: no plaintext, no TLS without a certificate from the mesh CA.
for port in "${PORTS[@]}"; do
  addr=$NAME:$port
  grpcurl_bare -plaintext -connect-timeout "$REFUSED_TIMEOUT" "$addr" list
  expect_refused "plaintext grpcurl refused by $addr"
  grpcurl_bare -cacert "$certs/ca.crt" -connect-timeout "$REFUSED_TIMEOUT" "$addr" list
  expect_refused "TLS grpcurl without a client certificate refused by $addr"
  grpcurl_ -d "{\"service\":\"${SERVICE[$port]}\"}" "$addr" grpc.health.v1.Health/Check
  expect "TLS grpcurl as the operator admitted by $addr" '"status": "SERVING"'
done

for port in "${PORTS[@]}"; do
  addr=$NAME:$port
  svc=${SERVICE[$port]}
  short=${svc#meshwork.}
  short=${short%%.*}

  grpcurl_ "$addr" list
  expect "list on $addr" \
    "^$(re_quote "$svc")\$" \
    '^grpc\.health\.v1\.Health$' \
    '^grpc\.reflection\.v1(alpha)?\.ServerReflection$'

  grpcurl_ -d "{\"service\":\"$svc\"}" "$addr" grpc.health.v1.Health/Check
  expect "health of $svc on $addr" '"status": "SERVING"'
  grpcurl_ "$addr" grpc.health.v1.Health/Check
  expect "health of the whole server on $addr" '"status": "SERVING"'

  # e.g. `rpc GetUser ( .meshwork.users.v1.GetUserRequest ) returns ( .meshwork.users.v1.GetUserResponse );`
  pkg_re=$(re_quote "${svc%.*}")
  rpc_res=()
  for rpc in ${RPCS[$short]}; do
    rpc_res+=("rpc $rpc \\( \\.$pkg_re\\.${rpc}Request \\) returns \\( (stream )?\\.$pkg_re\\.${rpc}Response \\);")
  done
  grpcurl_ "$addr" describe "$svc"
  expect "describe $svc on $addr" "^$(re_quote "$svc") is a service:" "${rpc_res[@]}"

  msg=${MESSAGE[$short]}
  grpcurl_ "$addr" describe "$msg"
  expect "describe $msg on $addr" "^$(re_quote "$msg") is a message:" "$(re_quote "${MESSAGE_FIELD[$short]}")"
done

grpcurl_ "$NAME:50054" describe meshwork.orders.v1.OrderService.WatchOrder
expect "describe WatchOrder: a server stream" 'returns \( stream \.meshwork\.orders\.v1\.WatchOrderResponse \)'

# users: CreateUser on one replica, read back on the other (they share one database). The email
# is normalised (trimmed, lower-cased).
suffix=$(date +%s)-$$-$RANDOM
grpcurl_ -d "{\"email\":\"  E2E-Grpcurl-$suffix@Example.COM \",\"display_name\":\"E2E grpcurl\"}" \
  "$NAME:50051" meshwork.users.v1.UserService/CreateUser
expect "users CreateUser on :50051" "\"email\": \"e2e-grpcurl-$suffix@example\\.com\"" '"id": "[^"]+"'
user_id=$(json_field 'd["user"]["id"]')

grpcurl_ -d "{\"id\":\"$user_id\"}" "$NAME:50061" meshwork.users.v1.UserService/GetUser
expect "users GetUser on the other replica :50061" "\"id\": \"$(re_quote "$user_id")\"" \
  "\"email\": \"e2e-grpcurl-$suffix@example\\.com\""

grpcurl_ -d "{\"email\":\"e2e-grpcurl-$suffix@example.com\",\"display_name\":\"Again\"}" \
  "$NAME:50061" meshwork.users.v1.UserService/CreateUser
expect_code "users CreateUser with a taken email: ALREADY_EXISTS" AlreadyExists

grpcurl_ -d '{"email":"not an email","display_name":"Nobody"}' \
  "$NAME:50051" meshwork.users.v1.UserService/CreateUser
expect_code "users CreateUser with an invalid email: INVALID_ARGUMENT" InvalidArgument

# auth: the public keys, as a JSON Web Key Set of Ed25519 keys.
grpcurl_ -d '{}' "$NAME:50052" meshwork.auth.v1.AuthService/GetJwks
expect "auth GetJwks" '"kid": "[^"]+"' '"kty": "OKP"' '"crv": "Ed25519"' '"x": "[A-Za-z0-9_-]+"'

# billing: no account before the first top-up.
grpcurl_ -d "{\"user_id\":\"e2e-unknown-$suffix\"}" "$NAME:50053" meshwork.billing.v1.BillingService/GetAccount
expect_code "billing GetAccount of an unknown user: NOT_FOUND" NotFound

# orders: a fresh user has no orders.
grpcurl_ -d "{\"user_id\":\"$user_id\"}" "$NAME:50054" meshwork.orders.v1.OrderService/ListOrders
expect "orders ListOrders of a fresh user"
[[ $(json_field 'len(d.get("orders", []))') == 0 ]] || fail "orders ListOrders of a fresh user is not empty:\n$out"

# ---- 3. a generated Python client walks the journey -----------------------------------------

gen=$tmp/python
mkdir -p "$gen"
# shellcheck disable=SC2046 # one argument per .proto file; their paths have no spaces
"$PYTHON" -m grpc_tools.protoc -I proto --python_out="$gen" --grpc_python_out="$gen" \
  $(find proto -name '*.proto' | sort) || fail "grpc_tools.protoc could not generate a Python client from proto/"
pass "Python client generated from proto/ ($(find "$gen" -name '*_pb2*.py' | wc -l) modules)"

"$PYTHON" tests/e2e/journey.py --generated "$gen" --host "$NAME" \
  --ca "$certs/ca.crt" --cert "$certs/$OPERATOR.crt" --key "$certs/$OPERATOR.key" || fail "journey.py failed"
pass "journey.py"

# ---- 4. Ctrl-C stops everything -------------------------------------------------------------

kill -INT "$mesh_pid"
deadline=$((SECONDS + STOP_TIMEOUT))
while kill -0 "$mesh_pid" 2>/dev/null; do
  ((SECONDS < deadline)) || fail "meshctl still running ${STOP_TIMEOUT}s after SIGINT"
  sleep 0.2
done
mesh_status=0
wait "$mesh_pid" || mesh_status=$?
mesh_pid=
((mesh_status == 0)) || fail "meshctl exited $mesh_status after SIGINT, not 0"
pass "meshctl up exited 0 on SIGINT"

mapfile -t left < <(leftovers)
((${#left[@]} == 0)) || fail "service processes still running after meshctl exited: ${left[*]}"
for port in "${PORTS[@]}"; do
  ! port_open "$port" || fail "port $port still accepts connections after meshctl exited"
done
pass "no service process left, every port free"
