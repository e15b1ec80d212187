//! Writes the CRD YAML of every Sendense resource to `config/crd/bases/` and
//! `charts/sendense/crds/` (or, with `--check`, fails when the committed files differ).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kube::Resource;
use sendense_crds::{all_crds, crd_yaml};

const OUTPUT_DIRS: [&str; 2] = ["config/crd/bases", "charts/sendense/crds"];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    let root = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    match run(&root, check) {
        Ok(stale) if stale.is_empty() => ExitCode::SUCCESS,
        Ok(stale) => {
            for path in stale {
                eprintln!("out of date: {}", path.display());
            }
            eprintln!("the committed CRDs differ from the types: run `make crds` and commit");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes (or checks) every CRD file; returns the files that were stale.
fn run(root: &Path, check: bool) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let mut stale = Vec::new();
    for crd in all_crds() {
        let name = crd.meta().name.clone().ok_or("CRD without a name")?;
        let text = crd_yaml(&crd)?;
        for dir in OUTPUT_DIRS {
            let path = root.join(dir).join(format!("{name}.yaml"));
            let current = std::fs::read_to_string(&path).ok();
            if current.as_deref() == Some(text.as_str()) {
                continue;
            }
            if check {
                stale.push(path);
            } else {
                std::fs::create_dir_all(root.join(dir))?;
                std::fs::write(&path, &text)?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(stale)
}
