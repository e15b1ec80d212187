//! Standard Kubernetes conditions, merged the way `kubectl` users expect: one entry per type,
//! and `lastTransitionTime` moves only when the status actually changes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition status values, as the API spells them.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Builds a condition stamped with `now`; `observed_generation` is the spec generation it
/// describes.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Puts `new` into `conditions`, replacing the entry of the same type. When the status is
/// unchanged the old `lastTransitionTime` is kept, so the time says when the state began, not
/// when the controller last looked. Returns true when anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            let changed = *old != new;
            *old = new;
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of a type, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when the condition of that type is present with status "True".
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid timestamp"))
    }

    #[test]
    fn same_status_keeps_transition_time_but_takes_new_message() {
        let mut conds = vec![condition(
            "Ready",
            TRUE,
            "Probed",
            "vCenter 8.0",
            Some(1),
            at(100),
        )];
        let changed = set_condition(
            &mut conds,
            condition("Ready", TRUE, "Probed", "vCenter 8.0.2", Some(2), at(200)),
        );
        assert!(changed);
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, at(100));
        assert_eq!(conds[0].message, "vCenter 8.0.2");
        assert_eq!(conds[0].observed_generation, Some(2));
    }

    #[test]
    fn status_change_moves_transition_time() {
        let mut conds = vec![condition("Ready", TRUE, "Probed", "ok", None, at(100))];
        set_condition(
            &mut conds,
            condition("Ready", FALSE, "LoginFailed", "bad password", None, at(300)),
        );
        assert_eq!(conds[0].last_transition_time, at(300));
        assert_eq!(conds[0].status, FALSE);
        assert!(!is_true(&conds, "Ready"));
    }

    #[test]
    fn identical_condition_is_no_change_and_other_types_are_untouched() {
        let mut conds = vec![
            condition("Ready", TRUE, "Probed", "ok", None, at(100)),
            condition("Degraded", FALSE, "Fine", "", None, at(50)),
        ];
        let changed = set_condition(
            &mut conds,
            condition("Ready", TRUE, "Probed", "ok", None, at(999)),
        );
        assert!(!changed);
        assert_eq!(conds.len(), 2);
        assert_eq!(
            find(&conds, "Degraded").map(|c| c.reason.as_str()),
            Some("Fine")
        );
        assert!(is_true(&conds, "Ready"));
    }
}
