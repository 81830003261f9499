//! Meshwork's contracts: the Rust code generated from `proto/` (messages, tonic clients and
//! servers) and the encoded FileDescriptorSet that gRPC reflection serves. The only hand-written
//! code is the redacting `Debug` of the auth messages that carry passwords and tokens.

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

        use std::fmt;

        /// What a redacted secret prints as.
        const REDACTED: &str = "<redacted>";

        impl fmt::Debug for RegisterRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("RegisterRequest")
                    .field("email", &self.email)
                    .field("password", &REDACTED)
                    .field("display_name", &self.display_name)
                    .finish()
            }
        }

        impl fmt::Debug for LoginRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("LoginRequest")
                    .field("email", &self.email)
                    .field("password", &REDACTED)
                    .finish()
            }
        }

        impl fmt::Debug for RefreshRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("RefreshRequest")
                    .field("refresh_token", &REDACTED)
                    .finish()
            }
        }

        impl fmt::Debug for LogoutRequest {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("LogoutRequest")
                    .field("refresh_token", &REDACTED)
                    .finish()
            }
        }

        impl fmt::Debug for TokenPair {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct("TokenPair")
                    .field("access_token", &REDACTED)
                    .field("expires_in_seconds", &self.expires_in_seconds)
                    .field("refresh_token", &REDACTED)
                    .field("token_type", &self.token_type)
                    .finish()
            }
        }

        #[cfg(test)]
        mod tests {
            use super::*;

            #[test]
            fn secrets_do_not_print() {
                let printed = format!(
                    "{:?} {:?} {:?}",
                    LoginRequest {
                        email: "a@b.c".into(),
                        password: "hunter2".into(),
                    },
                    RefreshRequest {
                        refresh_token: "rt-secret".into(),
                    },
                    LoginResponse {
                        user_id: "u".into(),
                        tokens: Some(TokenPair {
                            access_token: "at-secret".into(),
                            expires_in_seconds: 900,
                            refresh_token: "rt-secret".into(),
                            token_type: "Bearer".into(),
                        }),
                    },
                );
                for secret in ["hunter2", "rt-secret", "at-secret"] {
                    assert!(!printed.contains(secret), "{printed}");
                }
            }
        }
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
