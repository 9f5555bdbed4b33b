//! Health and reflection services, the two every Tandem gRPC server carries.

use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_reflection::server::{v1, v1alpha, Builder};

pub use tonic_health::server::HealthReporter;
pub use tonic_health::ServingStatus;

/// `grpc.health.v1` with the overall status ("") and each of `services` NOT_SERVING, so probes
/// fail until the caller reports SERVING (e.g. once the model has loaded).
pub async fn health_service(services: &[&str]) -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, server) = tonic_health::server::health_reporter();
    set_health(&reporter, services, ServingStatus::NotServing).await;
    (reporter, server)
}

/// Sets the overall status ("") and each of `services` to `status`.
pub async fn set_health(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for s in services {
        reporter.set_service_status(s, status).await;
    }
}

/// Server reflection (v1) over every Tandem proto plus `grpc.health.v1`, so grpcurl works with
/// no local copy of the protos. `services` names the services this server actually serves (the
/// reflection and health services are added); empty lists every service in the descriptors.
pub fn reflection_v1(
    services: &[&str],
) -> anyhow::Result<v1::ServerReflectionServer<impl v1::ServerReflection>> {
    Ok(builder(services).build_v1()?)
}

/// The same for the older v1alpha protocol, which some grpcurl versions still use.
pub fn reflection_v1alpha(
    services: &[&str],
) -> anyhow::Result<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>> {
    Ok(builder(services).build_v1alpha()?)
}

fn builder(services: &[&str]) -> Builder<'static> {
    let mut b = Builder::configure()
        .register_encoded_file_descriptor_set(tandem_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    if !services.is_empty() {
        for s in services.iter().copied().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            b = b.with_service_name(s);
        }
    }
    b
}

/// A client's own timer fires at its deadline, which a server knows only from the
/// `grpc-timeout` it was sent (and measures from a little later, when the request arrived): a
/// stream the client resets this close to its deadline ended by the deadline.
pub const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_millis(50);

/// The code of a stream whose client went away: DEADLINE_EXCEEDED when its deadline has (all
/// but) passed, CANCELLED otherwise.
pub fn dropped_stream_code(deadline: Option<std::time::Instant>) -> tonic::Code {
    match deadline {
        Some(d) if std::time::Instant::now() + DEADLINE_SLACK >= d => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Cancelled,
    }
}
