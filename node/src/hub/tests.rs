//! Hub behaviour driven through the in-memory transport: no sockets, no HTTP.
