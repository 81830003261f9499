//! Meshwork's contracts: the Rust code generated from `proto/` (messages, tonic clients and
//! servers) and the encoded FileDescriptorSet that gRPC reflection serves. Nothing else lives here.

/// The encoded `FileDescriptorSet` of every file under `proto/`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/meshwork_descriptor.bin"));

/// `meshwork.common.v1`: types shared by every service (money).
pub mod common {
    pub mod v1 {
        tonic::include_proto!("meshwork.common.v1");
    }
}

/// `meshwork.users.v1`: user profiles.
pub mod users {
    pub mod v1 {
        tonic::include_proto!("meshwork.users.v1");
    }
}

/// `meshwork.auth.v1`: credentials and tokens.
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("meshwork.auth.v1");
    }
}

/// `meshwork.billing.v1`: accounts and payments.
pub mod billing {
    pub mod v1 {
        tonic::include_proto!("meshwork.billing.v1");
    }
}

/// `meshwork.orders.v1`: orders and the payment saga.
pub mod orders {
    pub mod v1 {
        tonic::include_proto!("meshwork.orders.v1");
    }
}
