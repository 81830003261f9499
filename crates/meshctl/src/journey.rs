//! The user journey from the command line, through the generated Rust clients and the mesh's
//! client stack: register, login, top up, order, watch, cancel (and a balance check).
//! Addresses default to `meshctl up`'s ports; each can be overridden by flag or environment.
//! Every call goes over mutual TLS presenting the operator's certificate (from `--certs-dir`),
//! and carries `authorization: Bearer <token>` when `--token` is given, to act as that user.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use mesh::{
    client::MeshChannel,
    config::ClientConfig,
    pki::OPERATOR,
    tls::{MeshTls, TlsConfig},
};
use meshwork::{
    auth::v1::{LoginRequest, RegisterRequest, auth_service_client::AuthServiceClient},
    billing::v1::{GetAccountRequest, TopUpRequest, billing_service_client::BillingServiceClient},
    common::v1::Money,
    orders::v1::{
        CancelOrderRequest, CreateOrderRequest, Order, OrderItem, OrderStatus, WatchOrderRequest,
        order_service_client::OrderServiceClient,
    },
};
use tokio_stream::StreamExt;
use tonic::{
    Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
};

/// Where the services listen, and what a call presents to them.
#[derive(Args, Clone)]
pub struct Targets {
    #[arg(
        long,
        env = "MESHCTL_AUTH",
        default_value = "https://127.0.0.1:50052",
        global = true
    )]
    auth: String,
    #[arg(
        long,
        env = "MESHCTL_BILLING",
        default_value = "https://127.0.0.1:50053",
        global = true
    )]
    billing: String,
    #[arg(
        long,
        env = "MESHCTL_ORDERS",
        default_value = "https://127.0.0.1:50054",
        global = true
    )]
    orders: String,
    /// The mesh certificates (`meshctl certs`); calls present the operator's.
    #[arg(
        long,
        env = "MESHCTL_CERTS_DIR",
        default_value = crate::certs::DEFAULT_DIR,
        global = true
    )]
    certs_dir: PathBuf,
    /// An end user's access token (`meshctl login` prints one), sent with every call as
    /// `authorization: Bearer <token>`. Where a method admits end users, the call then acts as
    /// that user (their own data only), not as the operator whose certificate meshctl presents.
    #[arg(long, env = "MESHCTL_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

/// What every call goes through: the mesh stack, then the user's token, if any.
type Channel = InterceptedService<MeshChannel, Bearer>;

/// Adds `authorization: Bearer <token>` to every request, when there is a token.
#[derive(Clone)]
struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let Some(token) = token else {
            return Ok(Self(None));
        };
        let mut value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .context("--token must be printable ASCII (an access token from `meshctl login`)")?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The operator's TLS material and the user's token, loaded once for the command's calls.
struct Session {
    tls: MeshTls,
    bearer: Bearer,
}

impl Session {
    fn open(targets: &Targets) -> anyhow::Result<Self> {
        let dir = &targets.certs_dir;
        let tls = MeshTls::load(&TlsConfig::in_dir(dir, OPERATOR)).with_context(|| {
            format!(
                "loading the operator's certificate from {} (run `meshctl certs` or `meshctl up` first, or pass --certs-dir)",
                dir.display()
            )
        })?;
        Ok(Self {
            tls,
            bearer: Bearer::new(targets.token.as_deref())?,
        })
    }

    /// A mutual-TLS channel to `service` (its mesh name, which its certificate must carry).
    fn channel(&self, endpoint: &str, service: &str) -> anyhow::Result<Channel> {
        self.channel_with(ClientConfig::to(endpoint), service)
    }

    /// A watch lasts as long as the order is open, far beyond a unary call's default deadline.
    fn watch_channel(&self, endpoint: &str, service: &str) -> anyhow::Result<Channel> {
        /// An hour: a human watching an order gives up long before.
        const WATCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3600);
        let config = ClientConfig {
            default_deadline: WATCH_DEADLINE,
            ..ClientConfig::to(endpoint)
        };
        self.channel_with(config, service)
    }

    fn channel_with(&self, config: ClientConfig, service: &str) -> anyhow::Result<Channel> {
        config.validate(service)?;
        let channel = mesh::client::connect(&config, &self.tls, service)?;
        Ok(InterceptedService::new(channel, self.bearer.clone()))
    }
}

#[derive(Subcommand)]
pub enum JourneyCommand {
    /// Create an account (through auth, which creates the user in users).
    Register {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: String,
        #[arg(long, default_value = "Meshwork user")]
        name: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// Log in: prints the user id, an access token and a refresh token.
    Login {
        #[arg(long)]
        email: String,
        #[arg(long)]
        password: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// Add money to a user's account.
    TopUp {
        #[arg(long)]
        user: String,
        /// Minor units (cents).
        #[arg(long)]
        amount: i64,
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// Repeat a key to repeat a request safely; a fresh one by default.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        targets: Targets,
    },
    /// Show a user's balance.
    Balance {
        #[arg(long)]
        user: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// Place an order: `--item sku:quantity:unit_price_minor`, repeatable.
    Order {
        #[arg(long)]
        user: String,
        #[arg(long = "item", required = true)]
        items: Vec<String>,
        #[arg(long, default_value = "EUR")]
        currency: String,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        targets: Targets,
    },
    /// Follow an order's status until it is final.
    Watch {
        order: String,
        #[command(flatten)]
        targets: Targets,
    },
    /// Cancel an order (refunding it if it was paid).
    Cancel {
        order: String,
        #[command(flatten)]
        targets: Targets,
    },
}

fn fresh_key(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7())
}

impl JourneyCommand {
    fn targets(&self) -> &Targets {
        match self {
            Self::Register { targets, .. }
            | Self::Login { targets, .. }
            | Self::TopUp { targets, .. }
            | Self::Balance { targets, .. }
            | Self::Order { targets, .. }
            | Self::Watch { targets, .. }
            | Self::Cancel { targets, .. } => targets,
        }
    }
}

pub async fn run(command: JourneyCommand) -> anyhow::Result<()> {
    let session = Session::open(command.targets())?;
    match command {
        JourneyCommand::Register {
            email,
            password,
            name,
            targets,
        } => {
            let mut auth = AuthServiceClient::new(session.channel(&targets.auth, "auth")?);
            let response = auth
                .register(RegisterRequest {
                    email,
                    password,
                    display_name: name,
                })
                .await
                .context("register")?
                .into_inner();
            println!("user_id: {}", response.user_id);
        }
        JourneyCommand::Login {
            email,
            password,
            targets,
        } => {
            let mut auth = AuthServiceClient::new(session.channel(&targets.auth, "auth")?);
            let response = auth
                .login(LoginRequest { email, password })
                .await
                .context("login")?
                .into_inner();
            println!("user_id: {}", response.user_id);
            if let Some(tokens) = response.tokens {
                println!("access_token: {}", tokens.access_token);
                println!("expires_in_seconds: {}", tokens.expires_in_seconds);
                println!("refresh_token: {}", tokens.refresh_token);
            }
        }
        JourneyCommand::TopUp {
            user,
            amount,
            currency,
            key,
            targets,
        } => {
            let mut billing =
                BillingServiceClient::new(session.channel(&targets.billing, "billing")?);
            let response = billing
                .top_up(TopUpRequest {
                    user_id: user,
                    amount: Some(Money {
                        currency_code: currency,
                        amount_minor: amount,
                    }),
                    idempotency_key: key.unwrap_or_else(|| fresh_key("topup")),
                })
                .await
                .context("top up")?
                .into_inner();
            if let Some(payment) = response.payment {
                println!("payment_id: {}", payment.id);
            }
            if let Some(balance) = response.account.and_then(|a| a.balance) {
                println!("balance: {}", money(&balance));
            }
        }
        JourneyCommand::Balance { user, targets } => {
            let mut billing =
                BillingServiceClient::new(session.channel(&targets.billing, "billing")?);
            let account = billing
                .get_account(GetAccountRequest { user_id: user })
                .await
                .context("get account")?
                .into_inner()
                .account;
            if let Some(balance) = account.and_then(|a| a.balance) {
                println!("balance: {}", money(&balance));
            }
        }
        JourneyCommand::Order {
            user,
            items,
            currency,
            key,
            targets,
        } => {
            let items = items
                .iter()
                .map(|item| parse_item(item, &currency))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut orders = OrderServiceClient::new(session.channel(&targets.orders, "orders")?);
            let order = orders
                .create_order(CreateOrderRequest {
                    user_id: user,
                    items,
                    idempotency_key: key.unwrap_or_else(|| fresh_key("order")),
                })
                .await
                .context("create order")?
                .into_inner()
                .order;
            if let Some(order) = order {
                print_order(&order);
            }
        }
        JourneyCommand::Watch { order, targets } => {
            let mut orders =
                OrderServiceClient::new(session.watch_channel(&targets.orders, "orders")?);
            let mut stream = orders
                .watch_order(WatchOrderRequest { id: order })
                .await
                .context("watch order")?
                .into_inner();
            while let Some(message) = stream.next().await {
                if let Some(order) = message.context("watch order")?.order {
                    print_order(&order);
                }
            }
        }
        JourneyCommand::Cancel { order, targets } => {
            let mut orders = OrderServiceClient::new(session.channel(&targets.orders, "orders")?);
            let order = orders
                .cancel_order(CancelOrderRequest { id: order })
                .await
                .context("cancel order")?
                .into_inner()
                .order;
            if let Some(order) = order {
                print_order(&order);
            }
        }
    }
    Ok(())
}

/// `sku:quantity:unit_price_minor`.
fn parse_item(text: &str, currency: &str) -> anyhow::Result<OrderItem> {
    let mut parts = text.split(':');
    let (Some(sku), Some(quantity), Some(price), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        anyhow::bail!("item `{text}` must look like sku:quantity:unit_price_minor");
    };
    Ok(OrderItem {
        sku: sku.to_owned(),
        quantity: quantity
            .parse()
            .with_context(|| format!("quantity in `{text}`"))?,
        unit_price: Some(Money {
            currency_code: currency.to_owned(),
            amount_minor: price
                .parse()
                .with_context(|| format!("price in `{text}`"))?,
        }),
    })
}

fn money(money: &Money) -> String {
    format!(
        "{} {} (minor units)",
        money.amount_minor, money.currency_code
    )
}

fn print_order(order: &Order) {
    let status = OrderStatus::try_from(order.status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("ORDER_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| order.status.to_string());
    let total = order.total.as_ref().map(money).unwrap_or_default();
    print!("order {} {status} total {total}", order.id);
    if !order.failure_reason.is_empty() {
        print!(" ({})", order.failure_reason);
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_sent_as_a_bearer_authorization() -> anyhow::Result<()> {
        let request =
            Bearer::new(Some("header.claims.signature"))?.call(tonic::Request::new(()))?;
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer header.claims.signature")
        );
        Ok(())
    }

    #[test]
    fn without_a_token_no_authorization_is_sent() -> anyhow::Result<()> {
        let request = Bearer::new(None)?.call(tonic::Request::new(()))?;
        assert!(request.metadata().get("authorization").is_none());
        Ok(())
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert!(Bearer::new(Some("line\nbreak")).is_err());
    }
}
