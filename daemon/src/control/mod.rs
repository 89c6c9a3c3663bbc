//! Control plane (issue 11, DESIGN §6): the gRPC services on a unix socket, served by a small
//! tokio runtime on its own thread, talking to reactors and the store only by messages.
//! Being written.
