//! The OrderService gRPC handlers: decode and validate the request, check that the caller may
//! touch the order (an end user only their own: the request's `user_id`, or the stored order's),
//! hand it to the saga or the store, encode the answer. No other decisions are made here.

use mesh::{authz::require_owner, pagination::Page, status::FieldViolations};
use meshwork::orders::v1::{
    CancelOrderRequest, CancelOrderResponse, CreateOrderRequest, CreateOrderResponse,
    GetOrderRequest, GetOrderResponse, ListOrdersRequest, ListOrdersResponse, WatchOrderRequest,
    order_service_server::OrderService,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    domain::{NewOrder, Order},
    error::DomainError,
    order_watch::{self, OrderUpdates},
    saga::Saga,
    store::Store,
};

pub struct OrderApi {
    saga: Saga,
    store: Store,
    /// Turns true when the server starts shutting down: open watches end then.
    shutdown: watch::Receiver<bool>,
}

impl OrderApi {
    pub fn new(saga: Saga, store: Store, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            saga,
            store,
            shutdown,
        }
    }

    async fn existing(&self, id: &str) -> Result<Order, Status> {
        require(id, "id")?;
        Ok(self
            .store
            .get(id)
            .await?
            .ok_or_else(|| DomainError::OrderNotFound(id.to_owned()))?)
    }
}

/// INVALID_ARGUMENT naming `field` when `value` is empty.
fn require(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(mesh::status::invalid_argument(field, "must not be empty"));
    }
    Ok(())
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<CreateOrderRequest>,
    ) -> Result<Response<CreateOrderResponse>, Status> {
        let order = NewOrder::parse(request.get_ref())?;
        require_owner(&request, order.user_id())?;
        let order = self.saga.create(order).await?;
        Ok(Response::new(CreateOrderResponse {
            order: Some(order.to_proto()),
        }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<GetOrderResponse>, Status> {
        let order = self.existing(&request.get_ref().id).await?;
        require_owner(&request, &order.user_id)?;
        Ok(Response::new(GetOrderResponse {
            order: Some(order.to_proto()),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let ListOrdersRequest {
            user_id,
            page_size,
            page_token,
        } = request.get_ref();
        let mut violations = FieldViolations::new();
        if user_id.is_empty() {
            violations.add("user_id", "must not be empty");
        }
        let page = Page::parse(*page_size, page_token, &mut violations);
        violations.into_result()?;
        require_owner(&request, user_id)?;
        let (orders, next_page_token) = self.store.list_by_user(user_id, &page).await?;
        Ok(Response::new(ListOrdersResponse {
            orders: orders.iter().map(Order::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        let order = self.existing(&request.get_ref().id).await?;
        require_owner(&request, &order.user_id)?;
        let order = self.saga.cancel(&order.id).await?;
        Ok(Response::new(CancelOrderResponse {
            order: Some(order.to_proto()),
        }))
    }

    type WatchOrderStream = OrderUpdates;

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<Self::WatchOrderStream>, Status> {
        let order = self.existing(&request.get_ref().id).await?;
        require_owner(&request, &order.user_id)?;
        Ok(Response::new(order_watch::start(
            self.store.clone(),
            order,
            self.shutdown.clone(),
        )))
    }
}
