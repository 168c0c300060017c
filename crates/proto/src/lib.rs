//! Generated gRPC types of `bandshare.v1` and their conversions to the plain
//! types of `bandshare-core` (the orphan rule puts them here or there; here
//! keeps core free of generated code). The sources are in
//! `proto/bandshare/v1/`; `build.rs` compiles them with protox.

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("bandshare.v1");
}

pub mod convert;
