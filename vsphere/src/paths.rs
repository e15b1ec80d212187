//! Datastore paths: `"[datastore] dir/name.vmdk"` and the flat extent beside a descriptor.

/// `"[LocalDS_0] a/b.vmdk"` -> `("LocalDS_0", "a/b.vmdk")`. `None` when `p` is not a datastore
/// path. Datastore names may contain spaces; the path may be empty (the datastore root).
pub fn parse_datastore_path(p: &str) -> Option<(String, String)> {
    let rest = p.trim_start().strip_prefix('[')?;
    let (datastore, path) = rest.split_once(']')?;
    if datastore.is_empty() {
        return None;
    }
    Some((datastore.to_string(), path.trim_start().to_string()))
}

/// The raw data file of a monolithic flat disk: `"a/b.vmdk"` -> `"a/b-flat.vmdk"` (the
/// descriptor names it as its extent on VMFS and NFS datastores).
pub fn flat_extent_path(vmdk_relative: &str) -> String {
    match vmdk_relative.strip_suffix(".vmdk") {
        Some(stem) => format!("{stem}-flat.vmdk"),
        None => format!("{vmdk_relative}-flat.vmdk"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths() {
        let split = |p: &str| parse_datastore_path(p);
        assert_eq!(
            split("[LocalDS_0] cbt-vm-0/cbt-vm-0.vmdk"),
            Some(("LocalDS_0".into(), "cbt-vm-0/cbt-vm-0.vmdk".into()))
        );
        assert_eq!(
            split("[NFS store 1] vm one/vm one_1.vmdk"),
            Some(("NFS store 1".into(), "vm one/vm one_1.vmdk".into()))
        );
        assert_eq!(split("[ds1]"), Some(("ds1".into(), String::new())));
        assert_eq!(split("ds1/a.vmdk"), None);
        assert_eq!(split("[] a.vmdk"), None);
        assert_eq!(split("[ds1 a.vmdk"), None);
    }

    #[test]
    fn flat_extents() {
        assert_eq!(flat_extent_path("a/b.vmdk"), "a/b-flat.vmdk");
        assert_eq!(
            flat_extent_path("cbt-vm-0/cbt-vm-0-snapshot-66.vmdk"),
            "cbt-vm-0/cbt-vm-0-snapshot-66-flat.vmdk"
        );
        assert_eq!(flat_extent_path("a/b"), "a/b-flat.vmdk");
    }
}
