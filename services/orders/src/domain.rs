//! Orders as this service understands them. A [`NewOrder`] can only be built by
//! [`NewOrder::parse`], so past the gRPC edge an order is known to have 1 to 100 valid items in
//! one currency and a total that fits in an `i64`. An [`Order`] is a stored order, with its
//! [`OrderStatus`] in the saga.

use mesh::status::FieldViolations;
use meshwork::orders::v1::{self as proto, CreateOrderRequest};

/// Most items in one order: keeps a row set, a charge and a response of bounded size.
pub const MAX_ITEMS: usize = 100;
/// Longest SKU, in characters.
pub const MAX_SKU_CHARS: usize = 64;
/// Most units of one item: larger quantities are almost always a typing mistake.
pub const MAX_QUANTITY: i32 = 1000;
/// Longest idempotency key, in characters (a UUID or a hash fits easily).
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 128;
/// An ISO 4217 code has exactly this many letters.
const CURRENCY_CODE_LETTERS: usize = 3;

/// Where an order is in its saga. PAID is not final: a paid order can still be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Persisted; the charge has not completed (yet, or the process died: recovery resumes it).
    Pending,
    Paid,
    /// Final: billing refused the charge.
    PaymentFailed,
    /// Final: refunded when it had been paid.
    Cancelled,
}

impl OrderStatus {
    /// The value stored in the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Paid => "PAID",
            Self::PaymentFailed => "PAYMENT_FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    /// The status a stored `status` column holds, if it is one.
    pub fn parse(stored: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Paid,
            Self::PaymentFailed,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == stored)
    }

    /// Whether no further change can happen (a watch ends there).
    pub fn is_final(self) -> bool {
        matches!(self, Self::PaymentFailed | Self::Cancelled)
    }

    pub fn to_proto(self) -> proto::OrderStatus {
        match self {
            Self::Pending => proto::OrderStatus::Pending,
            Self::Paid => proto::OrderStatus::Paid,
            Self::PaymentFailed => proto::OrderStatus::PaymentFailed,
            Self::Cancelled => proto::OrderStatus::Cancelled,
        }
    }
}

/// One line of an order; its unit price is in the order's currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub sku: String,
    pub quantity: i32,
    pub unit_price_minor: i64,
}

/// A valid request for an order, not yet stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    user_id: String,
    currency_code: String,
    items: Vec<Item>,
    total_minor: i64,
    idempotency_key: String,
}

impl NewOrder {
    /// Turns a request into a `NewOrder`, or one INVALID_ARGUMENT naming every bad field.
    pub fn parse(request: &CreateOrderRequest) -> Result<Self, tonic::Status> {
        let mut violations = FieldViolations::new();
        if request.user_id.is_empty() {
            violations.add("user_id", "must not be empty");
        }
        let lines = parse_items(&request.items, &mut violations);
        let key_chars = request.idempotency_key.chars().count();
        if !(1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&key_chars) {
            violations.add(
                "idempotency_key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"),
            );
        }
        violations.into_result()?;
        let Some((currency_code, items, total_minor)) = lines else {
            // parse_items returns None only after recording a violation.
            return Err(mesh::status::invalid_argument("items", "are invalid"));
        };
        Ok(Self {
            user_id: request.user_id.clone(),
            currency_code,
            items,
            total_minor,
            idempotency_key: request.idempotency_key.clone(),
        })
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    pub fn currency_code(&self) -> &str {
        &self.currency_code
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The sum of quantity × unit price over the items.
    pub fn total_minor(&self) -> i64 {
        self.total_minor
    }

    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }
}

/// Checks every item, recording each problem; returns the currency, the items and the total
/// when all are valid.
fn parse_items(
    items: &[proto::OrderItem],
    violations: &mut FieldViolations,
) -> Option<(String, Vec<Item>, i64)> {
    if !(1..=MAX_ITEMS).contains(&items.len()) {
        violations.add("items", format!("must hold 1 to {MAX_ITEMS} items"));
        return None;
    }
    let before = violations.fields().len();
    let mut currency: Option<&str> = None;
    let mut parsed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let sku_chars = item.sku.chars().count();
        if !(1..=MAX_SKU_CHARS).contains(&sku_chars) {
            violations.add(
                format!("items[{i}].sku"),
                format!("must be 1 to {MAX_SKU_CHARS} characters"),
            );
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            violations.add(
                format!("items[{i}].quantity"),
                format!("must be 1 to {MAX_QUANTITY}"),
            );
        }
        let Some(price) = &item.unit_price else {
            violations.add(format!("items[{i}].unit_price"), "is required");
            continue;
        };
        if !is_currency_code(&price.currency_code) {
            violations.add(
                format!("items[{i}].unit_price.currency_code"),
                "must be three upper-case letters (ISO 4217)",
            );
        } else {
            match currency {
                None => currency = Some(&price.currency_code),
                Some(first) if first != price.currency_code => violations.add(
                    format!("items[{i}].unit_price.currency_code"),
                    format!("must be {first}, like the other items: an order has one currency"),
                ),
                Some(_) => {}
            }
        }
        if price.amount_minor < 0 {
            violations.add(
                format!("items[{i}].unit_price.amount_minor"),
                "must not be negative",
            );
        }
        parsed.push(Item {
            sku: item.sku.clone(),
            quantity: item.quantity,
            unit_price_minor: price.amount_minor,
        });
    }
    if violations.fields().len() > before {
        return None;
    }
    let Some(total) = total_minor(&parsed) else {
        violations.add("items", "the order total does not fit in 64 bits");
        return None;
    };
    Some((currency?.to_owned(), parsed, total))
}

fn is_currency_code(code: &str) -> bool {
    code.len() == CURRENCY_CODE_LETTERS && code.bytes().all(|b| b.is_ascii_uppercase())
}

/// Σ quantity × unit price, or `None` when it overflows.
fn total_minor(items: &[Item]) -> Option<i64> {
    items.iter().try_fold(0_i64, |total, item| {
        i64::from(item.quantity)
            .checked_mul(item.unit_price_minor)
            .and_then(|line| total.checked_add(line))
    })
}

/// A stored order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub status: OrderStatus,
    pub currency_code: String,
    pub total_minor: i64,
    pub items: Vec<Item>,
    /// Billing's reason, when the payment failed.
    pub failure_reason: Option<String>,
    /// The billing charge, once paid.
    pub payment_id: Option<String>,
    pub idempotency_key: String,
    pub create_ms: i64,
    pub update_ms: i64,
}

impl Order {
    /// The idempotency key of this order's charge: every attempt (the saga's, each recovery
    /// sweep's, another replica's) sends the same one, so billing charges at most once.
    pub fn charge_key(&self) -> String {
        format!("order:{}:charge", self.id)
    }

    /// The idempotency key of this order's refund, for the same reason.
    pub fn refund_key(&self) -> String {
        format!("order:{}:refund", self.id)
    }

    /// What billing records as the payment's reference.
    pub fn payment_reference(&self) -> String {
        format!("order:{}", self.id)
    }

    pub fn to_proto(&self) -> proto::Order {
        let money = |amount_minor| meshwork::common::v1::Money {
            currency_code: self.currency_code.clone(),
            amount_minor,
        };
        proto::Order {
            id: self.id.clone(),
            user_id: self.user_id.clone(),
            items: self
                .items
                .iter()
                .map(|item| proto::OrderItem {
                    sku: item.sku.clone(),
                    quantity: item.quantity,
                    unit_price: Some(money(item.unit_price_minor)),
                })
                .collect(),
            total: Some(money(self.total_minor)),
            status: self.status.to_proto().into(),
            failure_reason: self.failure_reason.clone().unwrap_or_default(),
            payment_id: self.payment_id.clone().unwrap_or_default(),
            idempotency_key: self.idempotency_key.clone(),
            create_time: Some(mesh::timestamp::from_millis(self.create_ms)),
            update_time: Some(mesh::timestamp::from_millis(self.update_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use meshwork::common::v1::Money;

    use super::*;

    fn item(sku: &str, quantity: i32, currency: &str, amount_minor: i64) -> proto::OrderItem {
        proto::OrderItem {
            sku: sku.to_owned(),
            quantity,
            unit_price: Some(Money {
                currency_code: currency.to_owned(),
                amount_minor,
            }),
        }
    }

    fn request(items: Vec<proto::OrderItem>) -> CreateOrderRequest {
        CreateOrderRequest {
            user_id: "user-1".to_owned(),
            items,
            idempotency_key: "key-1".to_owned(),
        }
    }

    fn violated_fields(request: &CreateOrderRequest) -> Vec<String> {
        match NewOrder::parse(request) {
            Ok(order) => panic!("expected violations, parsed {order:?}"),
            Err(status) => mesh::status::field_violations(&status)
                .into_iter()
                .map(|(field, _)| field)
                .collect(),
        }
    }

    #[test]
    fn total_is_the_sum_of_quantity_times_price() -> Result<(), tonic::Status> {
        let order = NewOrder::parse(&request(vec![
            item("apple", 3, "EUR", 150),
            item("pear", 2, "EUR", 75),
        ]))?;
        assert_eq!(order.total_minor(), 600);
        assert_eq!(order.currency_code(), "EUR");
        assert_eq!(order.items().len(), 2);
        Ok(())
    }

    #[test]
    fn every_violation_is_reported_at_once() {
        let mut bad = request(vec![
            item("", 0, "eur", -1),
            proto::OrderItem {
                sku: "x".repeat(MAX_SKU_CHARS + 1),
                quantity: MAX_QUANTITY + 1,
                unit_price: None,
            },
        ]);
        bad.user_id.clear();
        bad.idempotency_key = "k".repeat(MAX_IDEMPOTENCY_KEY_CHARS + 1);
        assert_eq!(
            violated_fields(&bad),
            vec![
                "user_id",
                "items[0].sku",
                "items[0].quantity",
                "items[0].unit_price.currency_code",
                "items[0].unit_price.amount_minor",
                "items[1].sku",
                "items[1].quantity",
                "items[1].unit_price",
                "idempotency_key",
            ]
        );
    }

    #[test]
    fn mixed_currencies_are_rejected() {
        let bad = request(vec![item("a", 1, "EUR", 1), item("b", 1, "USD", 1)]);
        assert_eq!(
            violated_fields(&bad),
            vec!["items[1].unit_price.currency_code"]
        );
    }

    #[test]
    fn no_items_and_too_many_items_are_rejected() {
        assert_eq!(violated_fields(&request(Vec::new())), vec!["items"]);
        let many = vec![item("a", 1, "EUR", 1); MAX_ITEMS + 1];
        assert_eq!(violated_fields(&request(many)), vec!["items"]);
    }

    #[test]
    fn an_overflowing_total_is_invalid_argument() {
        let bad = request(vec![item("a", 2, "EUR", i64::MAX / 2 + 1)]);
        assert_eq!(violated_fields(&bad), vec!["items"]);
        let bad = request(vec![item("a", 1, "EUR", i64::MAX), item("b", 1, "EUR", 1)]);
        assert_eq!(violated_fields(&bad), vec!["items"]);
    }

    #[test]
    fn stored_statuses_round_trip() {
        for status in [
            OrderStatus::Pending,
            OrderStatus::Paid,
            OrderStatus::PaymentFailed,
            OrderStatus::Cancelled,
        ] {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::parse("SHIPPED"), None);
    }

    #[test]
    fn only_payment_failed_and_cancelled_are_final() {
        assert!(!OrderStatus::Pending.is_final());
        assert!(!OrderStatus::Paid.is_final());
        assert!(OrderStatus::PaymentFailed.is_final());
        assert!(OrderStatus::Cancelled.is_final());
    }
}
