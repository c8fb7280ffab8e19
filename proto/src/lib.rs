//! Generated code for Isthmus's four wire contracts. Nothing else lives
//! here: conversion into domain types happens at each consumer's boundary
//! (`impl TryFrom<pb::X> for X`).
//!
//! | package | what | who |
//! | --- | --- | --- |
//! | [`federation::v1`] | catalogue exchange between peer controllers | controller ↔ controller, port 15012 |
//! | [`config::v1`] | mesh config subscription | controller → sidecars and gateway, port 15010 |
//! | [`ca::v1`] | certificate signing from CSRs | sidecars and gateway → controller, port 15010 |
//! | [`tunnel::v1`] | header opening each QUIC tunnel stream | gateway ↔ gateway, UDP 15443 |
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

pub mod common {
    pub mod v1 {
        tonic::include_proto!("isthmus.common.v1");
    }
}
pub mod tunnel {
    pub mod v1 {
        tonic::include_proto!("isthmus.tunnel.v1");

        /// Largest encoded `TunnelRequest`/`TunnelResponse` accepted (the
        /// length prefix is a big-endian u16; this caps it lower).
        pub const MAX_HEADER_BYTES: usize = 16 * 1024;
        /// ALPN protocol id of the gateway-to-gateway QUIC connection.
        pub const ALPN: &[u8] = b"isthmus/1";
    }
}
pub mod ca {
    pub mod v1 {
        tonic::include_proto!("isthmus.ca.v1");
    }
}
pub mod federation {
    pub mod v1 {
        tonic::include_proto!("isthmus.federation.v1");

        /// Protocol version carried in `Hello.protocol_version`.
        pub const PROTOCOL_VERSION: u32 = 1;
    }
}
pub mod config {
    pub mod v1 {
        tonic::include_proto!("isthmus.config.v1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn tunnel_request_round_trips() {
        let req = tunnel::v1::TunnelRequest {
            service: "helloworld.sample.svc.cluster.local".into(),
            port: 5000,
            subset: "v1".into(),
            source_cluster: "east".into(),
            connection_id: "c-1".into(),
            attempt: 0,
            probe: false,
        };
        let bytes = req.encode_to_vec();
        assert!(bytes.len() < tunnel::v1::MAX_HEADER_BYTES);
        let back = tunnel::v1::TunnelRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x12];
        assert!(tunnel::v1::TunnelRequest::decode(&garbage[..]).is_err());
    }
}
