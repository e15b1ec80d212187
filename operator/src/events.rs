//! Events on Sendense's objects: one per condition change, Warning or Normal, the message cut to
//! what the API accepts. A failure to publish is logged, never fatal to a reconcile.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Publishes an Event about `object`.
pub async fn publish(
    recorder: &Recorder,
    object: &ObjectReference,
    warning: bool,
    reason: &str,
    message: &str,
    action: &str,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(message.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, object).await {
        tracing::warn!(
            object = object.name.as_deref().unwrap_or_default(),
            "publishing event {reason}: {e}"
        );
    }
}
