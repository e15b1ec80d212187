//! The archive: an OCI layout and a docker-archive at once, and built layers reused.

use super::*;

#[test]
fn the_archive_is_an_oci_layout_and_a_docker_archive_naming_the_image() {
    let s = Scratch::new("layout");
    let root = s.0.join("root");
    sample_tree(&root);
    let reference = Reference::parse("ghcr.io/sendense/sendense-agent:0.1.0").expect("ref");
    let config = ContainerConfig {
        user: "65532:65532".into(),
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        cmd: vec!["sendense-agent".into(), "--help".into()],
        working_dir: "/".into(),
        labels: BTreeMap::from([("org.opencontainers.image.version".into(), "0.1.0".into())]),
        ..ContainerConfig::default()
    };
    let out = s.0.join("agent.oci.tar");
    let layers = [
        dir_layer(&root, Owner::Root),
        LayerInput {
            source: LayerSource::Dir {
                path: root.join("usr"),
                owner: Owner::Root,
            },
            created_by: "second".into(),
        },
    ];
    let (written, _) = build_image(&reference, &config, EPOCH, &layers, &out).expect("image");

    let bytes = std::fs::read(&out).expect("archive");
    let seen = entries_of(&bytes);
    let names: Vec<&str> = seen.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(names[..2], ["blobs", "blobs/sha256"]);
    assert_eq!(
        names[names.len() - 3..],
        ["index.json", "manifest.json", "oci-layout"]
    );
    let files: BTreeMap<&str, &[u8]> = seen
        .iter()
        .map(|e| (e.path.as_str(), e.data.as_slice()))
        .collect();
    for (name, data) in &files {
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            assert_eq!(Digest::of(data).hex(), hex, "blob named by its digest");
        }
    }
    assert!(seen.iter().all(|e| e.mtime == EPOCH && e.uid == 0));
    let json = |n: &str| -> Value { serde_json::from_slice(files[n]).expect(n) };
    assert_eq!(json("oci-layout")["imageLayoutVersion"], "1.0.0");

    let index = json("index.json");
    assert_eq!(index["schemaVersion"], 2);
    let m = &index["manifests"][0];
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(m["digest"], written.manifest.to_string());
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        "ghcr.io/sendense/sendense-agent:0.1.0"
    );
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        "0.1.0"
    );

    let manifest: Value =
        serde_json::from_slice(files[format!("blobs/sha256/{}", written.manifest.hex()).as_str()])
            .expect("manifest");
    assert_eq!(manifest["config"]["digest"], written.config.to_string());
    assert_eq!(manifest["layers"].as_array().map(Vec::len), Some(2));
    let config_blob: Value =
        serde_json::from_slice(files[format!("blobs/sha256/{}", written.config.hex()).as_str()])
            .expect("config");
    assert_eq!(config_blob["created"], "2025-05-20T00:00:00Z");
    assert_eq!(config_blob["config"]["User"], "65532:65532");
    assert_eq!(config_blob["config"]["Cmd"][1], "--help");
    assert_eq!(config_blob["history"][1]["created_by"], "second");
    for (i, layer) in manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .enumerate()
    {
        assert_eq!(
            layer["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let digest = Digest::parse(layer["digest"].as_str().expect("digest")).expect("digest");
        let blob = files[format!("blobs/sha256/{}", digest.hex()).as_str()];
        assert_eq!(layer["size"], blob.len());
        let mut tar = Vec::new();
        GzDecoder::new(blob).read_to_end(&mut tar).expect("gzip");
        assert_eq!(
            config_blob["rootfs"]["diff_ids"][i],
            Digest::of(&tar).to_string()
        );
    }

    let docker = json("manifest.json");
    assert_eq!(
        docker[0]["RepoTags"][0],
        "ghcr.io/sendense/sendense-agent:0.1.0"
    );
    assert_eq!(
        docker[0]["Config"],
        format!("blobs/sha256/{}", written.config.hex())
    );
    assert_eq!(
        docker[0]["Layers"],
        manifest["layers"]
            .as_array()
            .map(|l| l
                .iter()
                .map(|d| format!("blobs/sha256/{}", &d["digest"].as_str().unwrap_or("")[7..]))
                .collect::<Vec<_>>())
            .expect("layers")
            .into_iter()
            .map(Value::from)
            .collect::<Value>()
    );
    assert_eq!(written.archive_size, bytes.len() as u64);
}

#[test]
fn a_built_layer_is_reused_as_it_is() {
    let s = Scratch::new("reuse");
    write(&s.0.join("root/f"), b"x", 0o644);
    let (first, _) = build_layer(
        &LayerSource::Dir {
            path: s.0.join("root"),
            owner: Owner::Root,
        },
        EPOCH,
        "cached base",
        &s.0,
    )
    .expect("layer");
    let json = serde_json::to_string(&first).expect("json");
    let back: BuiltLayer = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, first);
    let (again, _) =
        build_layer(&LayerSource::Built(back), EPOCH + 1, "other", &s.0).expect("reuse");
    assert_eq!(again, first);
}
