//! `RetrieveProperties` on the wire, around a vim_rs limitation.
//!
//! vim_rs types `MissingProperty.fault` as a bare `MethodFault`, but servers send a
//! `LocalizedMethodFault` (`<fault><fault xsi:type="..."/><localizedMessage/></fault>`), so any
//! answer with a `missingSet` fails to parse as a whole. The simulator answers every property
//! read of an expired session that way (NotAuthenticated per property), and vCenter uses
//! missing sets for per-property failures. So the call is made raw: the missing sets are cut out
//! and read here (path and fault type), the rest goes to vim_rs' parser.

use std::borrow::Cow;

use miniserde::Serialize;
use miniserde::ser::{Fragment, Map};
use vim_rs::core::client::{Error as VimError, Transport, VimClient, unmarshal_array};
use vim_rs::types::structs::{ObjectContent, PropertyFilterSpec};

/// A property the server did not return, and the fault type that says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Missing {
    pub path: String,
    pub fault: String,
}

/// The body of `RetrieveProperties` (what vim_rs' private request type serializes).
struct RetrievePropertiesRequest<'a> {
    spec_set: &'a [PropertyFilterSpec],
}

impl Serialize for RetrievePropertiesRequest<'_> {
    fn begin(&self) -> Fragment<'_> {
        Fragment::Map(Box::new(RequestFields {
            request: self,
            next: 0,
        }))
    }
}

struct RequestFields<'r, 'a> {
    request: &'r RetrievePropertiesRequest<'a>,
    next: usize,
}

impl Map for RequestFields<'_, '_> {
    fn next(&mut self) -> Option<(Cow<'_, str>, &dyn Serialize)> {
        self.next += 1;
        match self.next {
            1 => Some((Cow::Borrowed("_typeName"), &"RetrievePropertiesRequestType")),
            2 => Some((Cow::Borrowed("specSet"), &self.request.spec_set)),
            _ => None,
        }
    }
}

/// `RetrieveProperties` through `client`: the objects, and the properties the server left out.
pub(super) async fn retrieve_properties(
    client: &dyn VimClient,
    spec: &PropertyFilterSpec,
) -> Result<(Vec<ObjectContent>, Vec<Missing>), VimError> {
    let collector = client.service_content().property_collector.value.clone();
    let request = RetrievePropertiesRequest {
        spec_set: std::slice::from_ref(spec),
    };
    let Some(raw) = client
        .invoke_optional(
            "",
            "PropertyCollector",
            &collector,
            "RetrieveProperties",
            Some(&request),
        )
        .await?
    else {
        return Ok((Vec::new(), Vec::new()));
    };
    let text = std::str::from_utf8(&raw)
        .map_err(|_| VimError::ParseError("RetrieveProperties: not UTF-8".to_string()))?;
    let (rest, missing) = split_missing_sets(text);
    let objects = unmarshal_array::<ObjectContent>(Transport::Soap, rest.as_bytes())?;
    Ok((objects, missing))
}

/// Cuts every `<missingSet>...</missingSet>` out of a response, returning the rest and what
/// each one said. Element text cannot contain `<`, so the closing tag cannot appear inside.
pub(super) fn split_missing_sets(xml: &str) -> (Cow<'_, str>, Vec<Missing>) {
    const OPEN: &str = "<missingSet>";
    const CLOSE: &str = "</missingSet>";
    if !xml.contains(OPEN) {
        return (Cow::Borrowed(xml), Vec::new());
    }
    let mut rest = String::with_capacity(xml.len());
    let mut missing = Vec::new();
    let mut tail = xml;
    while let Some(start) = tail.find(OPEN) {
        let Some(len) = tail[start..].find(CLOSE) else {
            break;
        };
        let element = &tail[start + OPEN.len()..start + len];
        rest.push_str(&tail[..start]);
        tail = &tail[start + len + CLOSE.len()..];
        missing.push(Missing {
            path: between(element, "<path>", "</path>")
                .unwrap_or_default()
                .to_string(),
            // The inner fault's xsi:type (any prefix): the first `:type="` in the element.
            fault: between(element, ":type=\"", "\"")
                .unwrap_or("MethodFault")
                .to_string(),
        });
    }
    rest.push_str(tail);
    (Cow::Owned(rest), missing)
}

fn between<'s>(s: &'s str, open: &str, close: &str) -> Option<&'s str> {
    let from = s.find(open)? + open.len();
    let len = s[from..].find(close)?;
    Some(&s[from..from + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    // What the simulator sends for a property read without a session.
    const UNAUTHENTICATED: &str = r#"<RetrievePropertiesResponse xmlns="urn:vim25"><returnval><obj type="VirtualMachine">vm-62</obj><missingSet><path>config.changeTrackingEnabled</path><fault><fault xmlns:_XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" _XMLSchema-instance:type="NotAuthenticated"><object type="VirtualMachine">vm-62</object><privilegeId>System.Read</privilegeId></fault></fault></missingSet><missingSet><path>snapshot</path><fault><fault xsi:type="NoPermission"><object type="VirtualMachine">vm-62</object></fault><localizedMessage>denied</localizedMessage></fault></missingSet></returnval></RetrievePropertiesResponse>"#;

    #[test]
    fn missing_sets_are_cut_out_and_read() {
        let (rest, missing) = split_missing_sets(UNAUTHENTICATED);
        assert_eq!(
            rest,
            r#"<RetrievePropertiesResponse xmlns="urn:vim25"><returnval><obj type="VirtualMachine">vm-62</obj></returnval></RetrievePropertiesResponse>"#
        );
        assert_eq!(
            missing,
            vec![
                Missing {
                    path: "config.changeTrackingEnabled".into(),
                    fault: "NotAuthenticated".into()
                },
                Missing {
                    path: "snapshot".into(),
                    fault: "NoPermission".into()
                },
            ]
        );
    }

    #[test]
    fn answers_without_missing_sets_pass_untouched() {
        let xml = r#"<returnval><obj type="Task">task-1</obj><propSet><name>info.state</name></propSet></returnval>"#;
        let (rest, missing) = split_missing_sets(xml);
        assert!(matches!(rest, Cow::Borrowed(_)));
        assert_eq!(rest, xml);
        assert!(missing.is_empty());
    }
}
