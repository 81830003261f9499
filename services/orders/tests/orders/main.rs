//! The orders service end to end: in-process users, auth, billing and orders servers on port 0
//! with SQLite databases in temporary directories, over mutual TLS, driven through the generated
//! gRPC clients.

mod test_mesh;

mod access;
mod cancelling;
mod placing;
mod recovery;
mod watching;
