//! Generated gRPC types of `bandshare.v1`, nothing else. The sources are in
//! `proto/bandshare/v1/`; `build.rs` compiles them with protox.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("bandshare.v1");
}
