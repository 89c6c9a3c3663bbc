//! The services this daemon does not serve yet: exports need ublk (issue 12) and answer
//! FAILED_PRECONDITION. Each says so by name, so a client learns what is missing instead
//! of getting a fake answer.
//!
//! Replace a service here with a real one as its layer lands; the API (and the CLI wired
//! to it) does not change.

use std::sync::Arc;

use coreblk_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::error::Error;
use super::server::Shared;

/// Stands in for every unbuilt service.
#[derive(Debug)]
pub struct Unbuilt {
    shared: Arc<Shared>,
}

impl Unbuilt {
    /// A stand-in over the daemon's shared state (it still answers UNAVAILABLE while the
    /// daemon stops).
    #[must_use]
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn refuse(&self, e: Error) -> Status {
        match self.shared.check_serving() {
            Err(stopping) => stopping,
            Ok(()) => e.into(),
        }
    }
}

macro_rules! unbuilt_service {
    ($service:path; $($method:ident($req:ty) -> $resp:ty = $refusal:expr;)*) => {
        #[tonic::async_trait]
        impl $service for Unbuilt {
            $(
                async fn $method(
                    &self,
                    _request: Request<$req>,
                ) -> Result<Response<$resp>, Status> {
                    Err(self.refuse($refusal))
                }
            )*
        }
    };
}

fn no_exports(rpc: &'static str) -> Error {
    Error::ExportsNotBuilt { rpc }
}

unbuilt_service! { pb::exports_server::Exports;
    export_volume(pb::ExportVolumeRequest) -> pb::Export = no_exports("ExportVolume");
    unexport_volume(pb::UnexportVolumeRequest) -> pb::UnexportVolumeResponse = no_exports("UnexportVolume");
    list_exports(pb::ListExportsRequest) -> pb::ListExportsResponse = no_exports("ListExports");
}
