//! The vCenter simulator (sendense_e2e::vcsim) with the agent's vSphere client attached.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use sendense_e2e::vcsim::Simulator;
use sendense_vsphere::{Tls, VCenterConfig, VSphere, flat_extent_path, parse_datastore_path};

/// A running simulator; everything of `Simulator` plus vSphere client helpers.
pub struct Sim(pub Simulator);

impl Deref for Sim {
    type Target = Simulator;
    fn deref(&self) -> &Simulator {
        &self.0
    }
}

impl DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut Simulator {
        &mut self.0
    }
}

impl Sim {
    pub fn start(extra: &[&str]) -> Sim {
        Sim(Simulator::start(extra))
    }

    pub fn config(&self, tls: Tls) -> VCenterConfig {
        VCenterConfig {
            url: self.s("url"),
            username: self.s("username"),
            password: self.s("password"),
            tls,
            call_timeout: Duration::from_secs(10),
            task_timeout: Duration::from_secs(60),
        }
    }

    pub fn pinned(&self) -> VCenterConfig {
        self.config(Tls::Thumbprint(self.s("thumbprint")))
    }

    pub async fn connect(&self) -> VSphere {
        VSphere::connect(self.pinned()).await.expect("connect")
    }

    pub fn datastore_file(&self, file_name: &str) -> PathBuf {
        let (ds, rel) = parse_datastore_path(file_name).expect("datastore path");
        let root = self.info["datastores"][&ds]
            .as_str()
            .expect("datastore dir");
        Path::new(root).join(flat_extent_path(&rel))
    }
}
