//! Waiting for vSphere tasks, by polling `info.state` with backoff until `task_timeout`.
//!
//! Polling (rather than vim_rs' TaskTracker and WaitForUpdatesEx) keeps every request short and
//! under `call_timeout`, survives a re-login (the task lives on; only the session changed) and
//! reads only the three fields it needs, so a server that omits others cannot break it.

use std::time::Duration;

use tokio::time::Instant;
use vim_rs::types::boxed_types::ValueElements;
use vim_rs::types::enums::{MoTypesEnum, TaskInfoStateEnum};
use vim_rs::types::structs::{LocalizedMethodFault, ManagedObjectReference, MethodFault};
use vim_rs::types::vim_any::VimAny;

use super::error::{describe_fault, fault_name};
use super::{VSphere, VSphereError};

const FIRST_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(2);

impl VSphere {
    /// Waits for `task` to finish; its result (e.g. the new snapshot's reference) on success.
    /// `what` names the operation in errors ("creating snapshot X of VM Y").
    pub(super) async fn wait_task(
        &self,
        task: &ManagedObjectReference,
        what: &str,
    ) -> Result<Option<VimAny>, VSphereError> {
        let deadline = Instant::now() + self.task_timeout;
        let mut pause = FIRST_POLL;
        loop {
            let mut props = self
                .properties(task, &["info.state", "info.error", "info.result"])
                .await?
                .ok_or_else(|| VSphereError::NotFound(format!("task {} of {what}", task.value)))?;
            let state = match props.value("info.state") {
                Some(VimAny::Value(ValueElements::TaskInfoState(s))) => s,
                Some(VimAny::Value(ValueElements::PrimitiveString(s))) => {
                    TaskInfoStateEnum::from_str(&s)
                }
                other => {
                    return Err(VSphereError::Transport(format!(
                        "task {} of {what} has no readable state ({:?})",
                        task.value,
                        other.as_ref().map(vim_rs::core::pc_helpers::type_name)
                    )));
                }
            };
            match state {
                TaskInfoStateEnum::Success => return Ok(props.value("info.result")),
                TaskInfoStateEnum::Error => {
                    return Err(VSphereError::Task {
                        what: what.to_string(),
                        message: task_error_message(props.value("info.error")),
                    });
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                self.cancel_task(task).await;
                return Err(VSphereError::Timeout {
                    what: what.to_string(),
                    after: self.task_timeout,
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Best effort: a task we stopped waiting for should not go on behind our back.
    async fn cancel_task(&self, task: &ManagedObjectReference) {
        let cancelled = self
            .call("CancelTask", || async move {
                vim_rs::mo::Task::new(self.handle(), &task.value)
                    .cancel_task()
                    .await
            })
            .await;
        if let Err(e) = cancelled {
            tracing::debug!(task = %task.value, error = %e, "could not cancel a timed-out task");
        }
    }
}

/// `info.error` of a failed task: a LocalizedMethodFault on the wire.
pub(super) fn task_error_message(error: Option<VimAny>) -> String {
    let Some(VimAny::Object(error)) = error else {
        return "the task failed without saying why".to_string();
    };
    let error = error.as_any_box();
    let error = match error.downcast::<LocalizedMethodFault>() {
        Ok(localized) => {
            let detail = describe_fault(&localized.fault);
            return match localized.localized_message.filter(|m| !m.is_empty()) {
                Some(text) => format!("{}: {text} ({detail})", fault_name(&localized.fault)),
                None => format!("{}: {detail}", fault_name(&localized.fault)),
            };
        }
        Err(other) => other,
    };
    match error.downcast::<MethodFault>() {
        Ok(fault) => format!("{}: {}", fault_name(&fault), describe_fault(&fault)),
        Err(_) => "the task failed with an unreadable fault".to_string(),
    }
}

/// The managed object a task returned (e.g. the snapshot `CreateSnapshot_Task` made).
pub(super) fn result_moref(
    result: Option<VimAny>,
    kind: MoTypesEnum,
) -> Option<ManagedObjectReference> {
    match result? {
        VimAny::Object(o) => o
            .as_any_box()
            .downcast::<ManagedObjectReference>()
            .ok()
            .map(|m| *m),
        VimAny::Value(ValueElements::PrimitiveString(s)) => Some(ManagedObjectReference {
            r#type: kind,
            value: s,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_errors_read_like_vcenter_messages() {
        // `info.error` of a failed ReconfigVM_Task, as the simulator sends it.
        let xml = r#"<val xmlns:_XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" _XMLSchema-instance:type="LocalizedMethodFault"><fault _XMLSchema-instance:type="InvalidArgument"><invalidProperty>configSpec.guestId</invalidProperty></fault><localizedMessage>A specified parameter was not correct: configSpec.guestId</localizedMessage></val>"#;
        let error: VimAny = vim_rs::xml::de::from_xml(xml).expect("LocalizedMethodFault");
        assert_eq!(
            task_error_message(Some(error)),
            "InvalidArgument: A specified parameter was not correct: configSpec.guestId \
             (invalidProperty=configSpec.guestId)"
        );
        assert_eq!(
            task_error_message(None),
            "the task failed without saying why"
        );
    }
}
