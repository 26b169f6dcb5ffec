//! The gRPC requests the agent and the apiserver take, as bytes on the wire: the first byte
//! picks the message, the rest is its protobuf encoding. Decoding is prost's; what is ours is
//! the checking that follows (manifests in an apply, object references in a delete, an
//! endpoint's name, namespace and labels). Invariant beyond "no panic": a refusal says why.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            use clustermesh_apiserver::pb::ApplyRequest;
            let Ok(req) = ApplyRequest::decode(bytes) else {
                return;
            };
            if let Err(errors) = clustermesh_apiserver::grpc::parse_request(&req.documents) {
                assert!(!errors.0.is_empty(), "a refusal without a reason");
            }
        }
        1 => {
            use clustermesh_apiserver::pb::DeleteRequest;
            let Ok(req) = DeleteRequest::decode(bytes) else {
                return;
            };
            if let Err(errors) = clustermesh_apiserver::grpc::parse_refs(&req.objects) {
                assert!(!errors.0.is_empty(), "a refusal without a reason");
            }
        }
        _ => {
            use meshd_api::pb::AddEndpointRequest;
            let Ok(req) = AddEndpointRequest::decode(bytes) else {
                return;
            };
            if let Err(e) = meshd_agent::endpoints::check_add_request(&req) {
                assert!(!e.to_string().is_empty(), "a refusal without a reason");
            }
        }
    }
});
