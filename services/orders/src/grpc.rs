//! The OrderService gRPC handlers: decode and validate the request, hand it to the saga or the
//! store, encode the answer. No decisions are made here.

use mesh::{pagination::Page, status::FieldViolations};
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
        Ok(Response::new(GetOrderResponse {
            order: Some(order.to_proto()),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        if request.user_id.is_empty() {
            violations.add("user_id", "must not be empty");
        }
        let page = Page::parse(request.page_size, &request.page_token, &mut violations);
        violations.into_result()?;
        let (orders, next_page_token) = self.store.list_by_user(&request.user_id, &page).await?;
        Ok(Response::new(ListOrdersResponse {
            orders: orders.iter().map(Order::to_proto).collect(),
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<CancelOrderResponse>, Status> {
        let id = &request.get_ref().id;
        require(id, "id")?;
        let order = self.saga.cancel(id).await?;
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
        Ok(Response::new(order_watch::start(
            self.store.clone(),
            order,
            self.shutdown.clone(),
        )))
    }
}
