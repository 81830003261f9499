//! Billing's domain: values that can only hold valid data (`Money` is a positive amount of a
//! well-formed currency, an `IdempotencyKey` has an acceptable length, ...), the three requests
//! that move money, and the rules about balances and refunds. Requests are parsed into these once,
//! at the gRPC edge; nothing here knows about protobuf or SQL.

use std::fmt;

use mesh::status::FieldViolations;

use crate::error::DomainError;

/// ISO 4217 alphabetic codes are exactly three letters.
const CURRENCY_CODE_LEN: usize = 3;
/// Longest idempotency key accepted, in characters: room for a UUID with a prefix
/// (`order:<uuid>:refund:<n>`), short enough to index cheaply.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;

/// A user's id as the users service issued it: opaque here, never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        non_empty(raw).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A payment's id: a UUID v7 when issued here, so that ids sort in creation order (the order
/// `ListPayments` pages in). Opaque to callers, never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentId(String);

impl PaymentId {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        non_empty(raw).map(Self)
    }

    /// A fresh id, later than every id issued before it (on this clock).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn non_empty(raw: &str) -> Result<String, &'static str> {
    if raw.is_empty() {
        Err("must not be empty")
    } else {
        Ok(raw.to_owned())
    }
}

/// An ISO 4217 alphabetic currency code: three upper-case ASCII letters, e.g. `EUR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyCode(String);

impl CurrencyCode {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        if raw.len() == CURRENCY_CODE_LEN && raw.bytes().all(|b| b.is_ascii_uppercase()) {
            Ok(Self(raw.to_owned()))
        } else {
            Err("must be three upper-case letters (ISO 4217), e.g. EUR")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An amount of money that moves: a currency and a strictly positive number of minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Money {
    currency: CurrencyCode,
    amount_minor: i64,
}

impl Money {
    pub fn new(currency: CurrencyCode, amount_minor: i64) -> Result<Self, &'static str> {
        positive(amount_minor).map(|amount_minor| Self {
            currency,
            amount_minor,
        })
    }

    /// Parses both parts, recording a violation for each bad one under `<field>.currency_code`
    /// and `<field>.amount_minor`.
    pub fn parse(
        currency_code: &str,
        amount_minor: i64,
        field: &str,
        violations: &mut FieldViolations,
    ) -> Option<Self> {
        let currency = violations.check(
            &format!("{field}.currency_code"),
            CurrencyCode::parse(currency_code),
        );
        let amount_minor =
            violations.check(&format!("{field}.amount_minor"), positive(amount_minor));
        Some(Self {
            currency: currency?,
            amount_minor: amount_minor?,
        })
    }

    pub fn currency(&self) -> &CurrencyCode {
        &self.currency
    }

    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }
}

fn positive(amount_minor: i64) -> Result<i64, &'static str> {
    if amount_minor > 0 {
        Ok(amount_minor)
    } else {
        Err("must be greater than zero")
    }
}

/// The caller's name for one money movement: repeating it repeats the first result.
/// 1 to [`MAX_IDEMPOTENCY_KEY_CHARS`] printable characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let chars = raw.chars().count();
        if chars == 0 {
            Err("must not be empty".to_owned())
        } else if chars > MAX_IDEMPOTENCY_KEY_CHARS {
            Err(format!(
                "must be at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
            ))
        } else if raw.chars().any(char::is_control) {
            Err("must hold printable characters only".to_owned())
        } else {
            Ok(Self(raw.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which way a payment moved money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentKind {
    /// Money into an account.
    TopUp,
    /// Money out of an account.
    Charge,
    /// Money back into an account, against an earlier charge.
    Refund,
}

impl PaymentKind {
    /// The name stored in `payments.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TopUp => "TOP_UP",
            Self::Charge => "CHARGE",
            Self::Refund => "REFUND",
        }
    }

    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        match raw {
            "TOP_UP" => Ok(Self::TopUp),
            "CHARGE" => Ok(Self::Charge),
            "REFUND" => Ok(Self::Refund),
            _ => Err("unknown payment kind"),
        }
    }
}

/// One recorded movement of money; `amount` is positive and `kind` gives the direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub id: PaymentId,
    pub user_id: UserId,
    pub kind: PaymentKind,
    pub amount: Money,
    pub idempotency_key: IdempotencyKey,
    /// For a refund: the charge it gives back (part of).
    pub refunded_payment_id: Option<PaymentId>,
    pub reference: String,
    pub create_ms: i64,
}

/// A user's account: one currency, a balance that never goes below zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user_id: UserId,
    pub currency: CurrencyCode,
    pub balance_minor: i64,
    pub update_ms: i64,
}

impl Account {
    /// Fails unless `amount` is in this account's currency.
    pub fn require_currency(&self, amount: &Money) -> Result<(), DomainError> {
        if self.currency == amount.currency {
            Ok(())
        } else {
            Err(DomainError::CurrencyMismatch {
                user_id: self.user_id.clone(),
                account: self.currency.clone(),
                requested: amount.currency.clone(),
            })
        }
    }

    /// The balance after `amount` comes in: same currency, and a sum that fits.
    pub fn balance_after_credit(&self, amount: &Money) -> Result<i64, DomainError> {
        self.require_currency(amount)?;
        self.balance_minor
            .checked_add(amount.amount_minor)
            .ok_or_else(|| DomainError::BalanceOverflow {
                user_id: self.user_id.clone(),
                balance_minor: self.balance_minor,
                amount_minor: amount.amount_minor,
            })
    }
}

/// Adds money to an account, opening it (in the amount's currency) on first use.
#[derive(Debug, Clone)]
pub struct TopUp {
    pub user_id: UserId,
    pub amount: Money,
    pub idempotency_key: IdempotencyKey,
}

/// Takes money from an account when its balance covers it.
#[derive(Debug, Clone)]
pub struct Charge {
    pub user_id: UserId,
    pub amount: Money,
    pub idempotency_key: IdempotencyKey,
    /// Free text from the caller, e.g. `order:<id>`.
    pub reference: String,
}

impl Charge {
    /// Why this charge could not be taken from `account` (`None`: the user has no account yet).
    pub fn refusal(&self, account: Option<&Account>) -> DomainError {
        let balance_minor = match account {
            Some(account) => match account.require_currency(&self.amount) {
                Ok(()) => account.balance_minor,
                Err(mismatch) => return mismatch,
            },
            None => 0,
        };
        DomainError::InsufficientFunds {
            currency: self.amount.currency.clone(),
            balance_minor,
            charge_minor: self.amount.amount_minor,
        }
    }
}

/// Gives back (part of) a charge: `amount`, or all that remains unrefunded when `None`.
#[derive(Debug, Clone)]
pub struct Refund {
    pub payment_id: PaymentId,
    pub amount: Option<Money>,
    pub idempotency_key: IdempotencyKey,
}

impl Refund {
    /// What this refund gives back of `charge`, of which `refunded_minor` was already refunded:
    /// the requested amount, or the remainder; never more than the remainder.
    pub fn amount_from(&self, charge: &Payment, refunded_minor: i64) -> Result<Money, DomainError> {
        if charge.kind != PaymentKind::Charge {
            return Err(DomainError::NotACharge {
                id: charge.id.clone(),
                kind: charge.kind,
            });
        }
        let charged_minor = charge.amount.amount_minor;
        let remaining_minor = charged_minor.saturating_sub(refunded_minor).max(0);
        let Some(requested) = &self.amount else {
            return Money::new(charge.amount.currency.clone(), remaining_minor)
                .map_err(|_| DomainError::FullyRefunded(charge.id.clone()));
        };
        if requested.currency != charge.amount.currency {
            return Err(DomainError::CurrencyMismatch {
                user_id: charge.user_id.clone(),
                account: charge.amount.currency.clone(),
                requested: requested.currency.clone(),
            });
        }
        if requested.amount_minor > remaining_minor {
            return Err(DomainError::RefundExceedsCharge {
                id: charge.id.clone(),
                charged_minor,
                remaining_minor,
                requested_minor: requested.amount_minor,
            });
        }
        Ok(requested.clone())
    }
}

/// A request that moves money under an idempotency key.
pub trait IdempotentRequest {
    fn idempotency_key(&self) -> &IdempotencyKey;

    /// Whether `stored` (the payment already recorded under this key) is what this request
    /// would have recorded: then repeating it returns `stored`; otherwise the key is misused.
    fn is_repeated_by(&self, stored: &Payment) -> bool;
}

impl IdempotentRequest for TopUp {
    fn idempotency_key(&self) -> &IdempotencyKey {
        &self.idempotency_key
    }

    fn is_repeated_by(&self, stored: &Payment) -> bool {
        stored.kind == PaymentKind::TopUp
            && stored.user_id == self.user_id
            && stored.amount == self.amount
            && stored.refunded_payment_id.is_none()
    }
}

impl IdempotentRequest for Charge {
    fn idempotency_key(&self) -> &IdempotencyKey {
        &self.idempotency_key
    }

    fn is_repeated_by(&self, stored: &Payment) -> bool {
        stored.kind == PaymentKind::Charge
            && stored.user_id == self.user_id
            && stored.amount == self.amount
            && stored.refunded_payment_id.is_none()
    }
}

impl IdempotentRequest for Refund {
    fn idempotency_key(&self) -> &IdempotencyKey {
        &self.idempotency_key
    }

    /// The user is the charge's, so the refunded payment decides it; a refund that asked for
    /// "the remainder" matches whatever amount that remainder was the first time.
    fn is_repeated_by(&self, stored: &Payment) -> bool {
        stored.kind == PaymentKind::Refund
            && stored.refunded_payment_id.as_ref() == Some(&self.payment_id)
            && self
                .amount
                .as_ref()
                .is_none_or(|amount| *amount == stored.amount)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PaymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for CurrencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for PaymentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(amount_minor: i64) -> Money {
        Money {
            currency: CurrencyCode("EUR".to_owned()),
            amount_minor,
        }
    }

    fn charge_of(amount_minor: i64) -> Payment {
        Payment {
            id: PaymentId("p1".to_owned()),
            user_id: UserId("u1".to_owned()),
            kind: PaymentKind::Charge,
            amount: eur(amount_minor),
            idempotency_key: IdempotencyKey("k1".to_owned()),
            refunded_payment_id: None,
            reference: String::new(),
            create_ms: 0,
        }
    }

    fn refund(amount: Option<Money>) -> Refund {
        Refund {
            payment_id: PaymentId("p1".to_owned()),
            amount,
            idempotency_key: IdempotencyKey("k2".to_owned()),
        }
    }

    #[test]
    fn currency_codes_are_three_upper_case_letters() {
        assert!(CurrencyCode::parse("EUR").is_ok());
        for bad in ["eur", "EU", "EURO", "E1R", "", "ÉUR"] {
            assert!(CurrencyCode::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn money_violations_name_each_bad_part() {
        let mut violations = FieldViolations::new();
        assert_eq!(Money::parse("usd", -5, "amount", &mut violations), None);
        assert_eq!(
            violations.fields(),
            vec!["amount.currency_code", "amount.amount_minor"]
        );
    }

    #[test]
    fn zero_is_not_an_amount_that_moves() {
        let mut violations = FieldViolations::new();
        assert_eq!(Money::parse("EUR", 0, "amount", &mut violations), None);
        assert_eq!(violations.fields(), vec!["amount.amount_minor"]);
    }

    #[test]
    fn idempotency_keys_are_short_and_printable() {
        assert!(IdempotencyKey::parse("order:42").is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(MAX_IDEMPOTENCY_KEY_CHARS)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(MAX_IDEMPOTENCY_KEY_CHARS + 1)).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("a\nb").is_err());
    }

    #[test]
    fn credit_past_the_largest_balance_is_an_overflow_not_a_panic() {
        let account = Account {
            user_id: UserId("u1".to_owned()),
            currency: CurrencyCode("EUR".to_owned()),
            balance_minor: i64::MAX,
            update_ms: 0,
        };
        assert!(matches!(
            account.balance_after_credit(&eur(1)),
            Err(DomainError::BalanceOverflow { .. })
        ));
    }

    #[test]
    fn refund_defaults_to_the_remainder() -> Result<(), DomainError> {
        assert_eq!(refund(None).amount_from(&charge_of(1000), 300)?, eur(700));
        Ok(())
    }

    #[test]
    fn refund_never_exceeds_the_remainder() {
        assert!(matches!(
            refund(Some(eur(701))).amount_from(&charge_of(1000), 300),
            Err(DomainError::RefundExceedsCharge {
                remaining_minor: 700,
                ..
            })
        ));
        assert!(matches!(
            refund(None).amount_from(&charge_of(1000), 1000),
            Err(DomainError::FullyRefunded(_))
        ));
    }

    #[test]
    fn a_remainder_refund_repeats_whatever_it_refunded_first() {
        let stored = Payment {
            kind: PaymentKind::Refund,
            refunded_payment_id: Some(PaymentId("p1".to_owned())),
            amount: eur(700),
            ..charge_of(700)
        };
        assert!(refund(None).is_repeated_by(&stored));
        assert!(refund(Some(eur(700))).is_repeated_by(&stored));
        assert!(!refund(Some(eur(600))).is_repeated_by(&stored));
    }
}
