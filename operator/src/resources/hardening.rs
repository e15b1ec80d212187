//! The restrictions every pod the operator builds carries: no privilege escalation, no Linux
//! capabilities, the runtime's default seccomp profile. (They run as the image's user: the hub
//! must own files on the repository volume and the agent must read the datastores.)

use k8s_openapi::api::core::v1::{
    Capabilities, Pod, PodSecurityContext, SeccompProfile, SecurityContext,
};

pub fn harden(mut pod: Pod) -> Pod {
    if let Some(spec) = pod.spec.as_mut() {
        spec.security_context
            .get_or_insert_with(PodSecurityContext::default)
            .seccomp_profile = Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        });
        for c in spec
            .init_containers
            .iter_mut()
            .flatten()
            .chain(spec.containers.iter_mut())
        {
            c.security_context = Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    pod
}
