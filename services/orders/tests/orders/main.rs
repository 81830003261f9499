//! The orders service end to end: in-process users, billing and orders servers on port 0 with
//! SQLite databases in temporary directories, driven through the generated gRPC clients.

mod test_mesh;

mod cancelling;
mod placing;
mod recovery;
mod watching;
