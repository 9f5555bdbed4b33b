//! Generated gRPC types and stubs for Tandem's APIs (see proto/).
#![allow(clippy::all, clippy::unwrap_used)]

pub mod v1 {
    tonic::include_proto!("tandem.v1");
}

pub mod shard {
    pub mod v1 {
        tonic::include_proto!("tandem.shard.v1");
    }
}

pub mod draft {
    pub mod v1 {
        tonic::include_proto!("tandem.draft.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Tandem proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tandem_descriptor");
