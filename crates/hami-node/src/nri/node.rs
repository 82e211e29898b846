//! The NRI plugin's decisions for this node (`--allocation-mode nri`): at
//! a container's creation, its cards and limits from its pod's
//! allocation, written to the host, and HAMi's env and mounts for it as
//! the runtime's adjustment (replacing what Allocate answered from the
//! device IDs alone). Pods hami-scheduler did not allocate pass untouched.

use std::sync::Arc;

use hami_api::DeviceInfo;
use hami_api::annotations as ann;
use tokio::sync::watch;

use crate::allocate::Settings;
use crate::lockfree::{self, Owner, PreStartError};
use crate::nri::Handler;
use crate::pending::{BoxFuture, PodStore};
use crate::plugin::{random_uuid, write_container_files};
use crate::proto::ContainerAllocateResponse;
use crate::proto_nri::{Container, ContainerAdjustment, KeyValue, Mount, PodSandbox};

/// This node's NRI decisions.
pub struct NodeHandler {
    pub store: Arc<dyn PodStore>,
    pub cards: watch::Receiver<Vec<DeviceInfo>>,
    pub settings: Settings,
    pub node: String,
    /// The node's lock annotation, as the node watch shows it.
    pub node_lock: watch::Receiver<Option<String>>,
}

/// The runtime's adjustment for an Allocate-style answer: its env (the
/// runtime replaces a key already set, so the container's cards replace
/// Allocate's list of every card) and its mounts as bind mounts (a mount
/// at a destination already mounted replaces it).
pub fn adjustment(response: &ContainerAllocateResponse) -> ContainerAdjustment {
    let mut env: Vec<KeyValue> = response
        .envs
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect();
    env.sort_by(|a, b| a.key.cmp(&b.key));
    let mounts = response
        .mounts
        .iter()
        .map(|m| Mount {
            destination: m.container_path.clone(),
            r#type: "bind".into(),
            source: m.host_path.clone(),
            options: vec!["rbind".into(), if m.read_only { "ro" } else { "rw" }.into()],
        })
        .collect();
    ContainerAdjustment {
        annotations: Default::default(),
        mounts,
        env,
    }
}

impl NodeHandler {
    async fn create(
        &self,
        sandbox: &PodSandbox,
        container: &Container,
    ) -> Result<ContainerAdjustment, String> {
        // Only pods hami-scheduler allocated carry the annotation (tenants
        // cannot write it); others need no API call.
        if !sandbox
            .annotations
            .contains_key(ann::NVIDIA_DEVICES_ALLOCATED)
        {
            return Ok(ContainerAdjustment::default());
        }
        let started = std::time::Instant::now();
        let owner = Owner {
            namespace: sandbox.namespace.clone(),
            pod: sandbox.name.clone(),
            container: container.name.clone(),
        };
        let pod = self
            .store
            .get(&owner.namespace, &owner.pod)
            .await
            .map_err(|e| format!("pod {owner}: {e}"))?
            .filter(|p| p.metadata.uid.as_deref() == Some(sandbox.uid.as_str()))
            .ok_or_else(|| {
                PreStartError::PodGone {
                    owner: owner.clone(),
                }
                .to_string()
            })?;
        let cards = self.cards.borrow().clone();
        let plan = match lockfree::nri_plan(
            &pod,
            &owner,
            &self.node,
            &cards,
            &self.settings,
            &random_uuid(),
        ) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(ContainerAdjustment::default()),
            Err(e) => {
                let reason = e.to_string();
                lockfree::fail_once(self.store.as_ref(), &pod, &reason).await;
                return Err(reason);
            }
        };
        let (served, remaining) = plan;
        if let Err(e) = write_container_files(&served) {
            let reason = format!("pod {owner}: {e}");
            self.store.warn(&pod, &reason).await;
            return Err(reason);
        }
        let node_lock = self.node_lock.borrow().clone();
        lockfree::record_started(
            self.store.as_ref(),
            &pod,
            remaining.as_ref(),
            node_lock.as_deref(),
        )
        .await
        .map_err(|e| format!("pod {owner}: recording the allocation: {e}"))?;
        tracing::info!(
            pod = %format!("{}/{}", owner.namespace, owner.pod),
            container = %owner.container,
            elapsed_us = started.elapsed().as_micros() as u64,
            "NRI: container adjusted with its cards and limits"
        );
        Ok(adjustment(&served.response))
    }
}

impl Handler for NodeHandler {
    fn synchronize<'a>(
        &'a self,
        pods: &'a [PodSandbox],
        containers: &'a [Container],
    ) -> BoxFuture<'a, ()> {
        // Containers already running keep the dirs and limits files written
        // when they were created (they live on the host): nothing to redo.
        tracing::info!(
            pods = pods.len(),
            containers = containers.len(),
            "NRI: synchronized with the runtime"
        );
        Box::pin(async {})
    }

    fn create_container<'a>(
        &'a self,
        pod: &'a PodSandbox,
        container: &'a Container,
    ) -> BoxFuture<'a, Result<ContainerAdjustment, String>> {
        Box::pin(self.create(pod, container))
    }
}
