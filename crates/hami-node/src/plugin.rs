//! The `DevicePlugin` gRPC service and its unix socket server.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hami_api::DeviceInfo;
use tokio::net::UnixListener;
use tokio::sync::{Mutex, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tonic::{Request, Response, Status};

use crate::allocate::{self, Plan, Served, Settings};
use crate::devices::{plugin_devices, preferred_ids};
use crate::lockfree::{self, PreStartError};
use crate::pending::{PodStore, StoreError};
use crate::pod_resources::{DeviceOwners, OwnerError};
use crate::proto;
use crate::proto::device_plugin_server::{DevicePlugin, DevicePluginServer};

/// The device plugin of one resource (`nvidia.com/gpu`).
pub struct Plugin {
    cards: watch::Receiver<Vec<DeviceInfo>>,
    store: Arc<dyn PodStore>,
    settings: Settings,
    numa_topology: bool,
    preferred_allocation: bool,
    /// Allocate calls run one at a time: finding the pending pod and
    /// emptying its entry must not interleave.
    allocating: Mutex<()>,
    /// Where the host side of the vgpu lock dir is made, if anywhere.
    lock_dir: Option<PathBuf>,
    /// Allocation without the node lock through PreStartContainer, when set.
    lock_free: Option<LockFree>,
    /// Allocation without the node lock through NRI: Allocate answers from
    /// the device IDs alone, and the NRI plugin adjusts the container.
    nri: bool,
}

/// What allocation without the node lock needs: who received which
/// device IDs, this node's name and the resource served.
struct LockFree {
    owners: Arc<dyn DeviceOwners>,
    node: String,
    resource: String,
    /// The node's lock annotation, as the node watch shows it.
    node_lock: watch::Receiver<Option<String>>,
}

impl Plugin {
    /// A plugin advertising the cards of `cards` (whoever owns discovery
    /// sends a new list when a card's health changes), finding pods in
    /// `store`.
    pub fn new(
        cards: watch::Receiver<Vec<DeviceInfo>>,
        store: Arc<dyn PodStore>,
        settings: Settings,
    ) -> Plugin {
        Plugin {
            cards,
            store,
            settings,
            numa_topology: false,
            preferred_allocation: true,
            allocating: Mutex::new(()),
            lock_dir: Some(PathBuf::from(allocate::VGPU_LOCK_DIR)),
            lock_free: None,
            nri: false,
        }
    }

    /// Allocate without the node lock for NRI ([`crate::nri`]): Allocate
    /// answers from the device IDs alone (the links of [`lockfree`], which
    /// stay empty: the container fails closed if no NRI call adjusts it),
    /// and the runtime's CreateContainer call gives the container its
    /// cards, limits and mounts.
    pub fn with_nri(mut self) -> Plugin {
        self.nri = true;
        self
    }

    /// Allocate without the node lock ([`lockfree`]): Allocate answers
    /// from the device IDs alone, and PreStartContainer (then required)
    /// asks `owners` which container of `node` received the IDs of
    /// `resource` and writes that container's limits. `node_lock` follows
    /// the node's lock annotation: a pod that a scheduler speaking HAMi's
    /// protocol locked the node for gets the lock released once its last
    /// container has its limits.
    pub fn with_pod_resources(
        mut self,
        owners: Arc<dyn DeviceOwners>,
        node: &str,
        resource: &str,
        node_lock: watch::Receiver<Option<String>>,
    ) -> Plugin {
        self.lock_free = Some(LockFree {
            owners,
            node: node.to_string(),
            resource: resource.to_string(),
            node_lock,
        });
        self
    }

    /// Advertise each card's NUMA node to the kubelet's topology manager.
    pub fn with_numa_topology(mut self, on: bool) -> Plugin {
        self.numa_topology = on;
        self
    }

    /// Offer GetPreferredAllocation (on by default), which steers the
    /// kubelet to slots of the cards the scheduler chose.
    pub fn with_preferred_allocation(mut self, on: bool) -> Plugin {
        self.preferred_allocation = on;
        self
    }

    /// Make the host's vgpu lock dir at `dir` (HAMi: `/tmp/vgpulock`), or
    /// nowhere.
    pub fn with_lock_dir(mut self, dir: Option<PathBuf>) -> Plugin {
        self.lock_dir = dir;
        self
    }

    /// The options this plugin registers with and reports.
    pub fn options(&self) -> proto::DevicePluginOptions {
        proto::DevicePluginOptions {
            pre_start_required: self.lock_free.is_some(),
            // Without the lock the pod is not known before PreStart: no
            // preference to give.
            get_preferred_allocation_available: self.preferred_allocation
                && self.lock_free.is_none()
                && !self.nri,
        }
    }

    /// For each container request, in order, the slots of the cards the
    /// scheduler chose for the next containers still to allocate of the
    /// pod waiting here; no answer for a container when that cannot be
    /// worked out.
    async fn preferred(
        &self,
        request: proto::PreferredAllocationRequest,
    ) -> proto::PreferredAllocationResponse {
        let mut out = proto::PreferredAllocationResponse::default();
        let Ok(pod) = self.store.find_pending().await else {
            return out;
        };
        let Ok(to_allocate) = allocate::to_allocate(&pod) else {
            return out;
        };
        let cards = self.cards.borrow().clone();
        let mut entries = to_allocate.0.iter().filter(|c| !c.is_empty());
        for creq in &request.container_requests {
            let Some(desired) = entries.next() else {
                break;
            };
            let Some(ids) = preferred_ids(
                &creq.available_device_i_ds,
                &creq.must_include_device_i_ds,
                desired,
                usize::try_from(creq.allocation_size).unwrap_or(0),
                &cards,
            ) else {
                break;
            };
            out.container_responses
                .push(proto::ContainerPreferredAllocationResponse { device_i_ds: ids });
        }
        out
    }

    /// Serves on `listener` (see [`bind`]) until `shutdown` completes.
    pub async fn serve(
        self,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(DevicePluginServer::new(self))
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            .await
    }

    /// Allocate without the lock: one answer per container request from
    /// its device IDs; a previous owner's links of the same IDs go.
    fn allocate_lock_free(
        &self,
        request: &proto::AllocateRequest,
    ) -> Result<proto::AllocateResponse, Status> {
        let cards = self.cards.borrow().clone();
        let mut out = proto::AllocateResponse::default();
        for creq in &request.container_requests {
            let links =
                lockfree::AllocLinks::new(&self.settings, &lockfree::alloc_key(&creq.devices_ids));
            lockfree::unlink(&links).map_err(|e| {
                Status::internal(format!("removing {}: {e}", links.limits.display()))
            })?;
            out.container_responses.push(lockfree::allocate_response(
                &self.settings,
                &cards,
                &creq.devices_ids,
            ));
        }
        self.prepare_lock_dir();
        tracing::info!(
            containers = request.container_requests.len(),
            "allocated (limits follow at PreStartContainer)"
        );
        Ok(out)
    }

    /// PreStartContainer without the lock: the container the kubelet says
    /// received `ids` gets its dirs and limits file, and the paths its
    /// Allocate answer mounts point at them.
    async fn prestart(&self, lf: &LockFree, ids: Vec<String>) -> Result<(), Status> {
        let started = std::time::Instant::now();
        let owner = lf
            .owners
            .owner(&lf.resource, &ids)
            .await
            .map_err(|e| match e {
                OwnerError::Unavailable { .. } => Status::unavailable(e.to_string()),
                OwnerError::NotFound(_) => Status::failed_precondition(e.to_string()),
            })?;
        let pod = self
            .store
            .get(&owner.namespace, &owner.pod)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::failed_precondition(
                    PreStartError::PodGone {
                        owner: owner.clone(),
                    }
                    .to_string(),
                )
            })?;
        let cards = self.cards.borrow().clone();
        let plan =
            match lockfree::prestart_plan(&pod, &owner, &lf.node, &ids, &cards, &self.settings) {
                Ok(p) => p,
                Err(e) => {
                    // Nothing here changes by itself: the bind has failed
                    // (as HAMi's Allocate marks it).
                    let reason = e.to_string();
                    lockfree::fail_once(self.store.as_ref(), &pod, &reason).await;
                    return Err(Status::failed_precondition(reason));
                }
            };
        let linked = write_container_files(&plan.served).and_then(|()| {
            lockfree::point(&plan.links.dir, &plan.served.host_dir)?;
            lockfree::point(&plan.links.limits, &plan.served.limits_dir)
        });
        if let Err(e) = linked {
            let reason = format!("pod {owner}: {e}");
            self.store.warn(&pod, &reason).await;
            return Err(Status::internal(reason));
        }
        let node_lock = lf.node_lock.borrow().clone();
        lockfree::record_started(
            self.store.as_ref(),
            &pod,
            plan.remaining.as_ref(),
            node_lock.as_deref(),
        )
        .await
        .map_err(|e| Status::unavailable(format!("pod {owner}: recording the allocation: {e}")))?;
        tracing::info!(
            pod = %allocate::pod_key(&pod),
            container = %owner.container,
            done = plan.all_done(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "limits written before the container starts"
        );
        Ok(())
    }

    async fn run_allocate(
        &self,
        request: proto::AllocateRequest,
    ) -> Result<proto::AllocateResponse, Status> {
        if self.lock_free.is_some() || self.nri {
            return self.allocate_lock_free(&request);
        }
        let started = std::time::Instant::now();
        let _one_at_a_time = self.allocating.lock().await;
        let pod = self.store.find_pending().await.map_err(|e| match e {
            StoreError::NoPendingPod { .. } => Status::failed_precondition(e.to_string()),
            e => Status::unavailable(e.to_string()),
        })?;
        let cards = self.cards.borrow().clone();
        let plan = match allocate::plan(&pod, &request, &cards, &self.settings, &mut random_uuid) {
            Ok(p) => p,
            Err(e) => {
                let reason = e.to_string();
                self.store.fail(&pod, &reason).await;
                return Err(Status::failed_precondition(reason));
            }
        };
        if let Err(e) = self.prepare(&plan) {
            let reason = format!("pod {}: {e}", allocate::pod_key(&pod));
            self.store.fail(&pod, &reason).await;
            return Err(Status::internal(reason));
        }
        if let Err(e) = self
            .store
            .finish(&pod, &plan.remaining, plan.all_done())
            .await
        {
            let reason = format!(
                "pod {}: recording the allocation: {e}",
                allocate::pod_key(&pod)
            );
            self.store.fail(&pod, &reason).await;
            return Err(Status::unavailable(reason));
        }
        tracing::info!(
            pod = %allocate::pod_key(&pod),
            containers = ?plan.served.iter().map(|s| s.container.as_str()).collect::<Vec<_>>(),
            done = plan.all_done(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "allocated"
        );
        Ok(proto::AllocateResponse {
            container_responses: plan.responses(),
        })
    }

    /// The host side of each served container ([`write_container_files`])
    /// and the vgpu lock dir.
    fn prepare(&self, plan: &Plan) -> std::io::Result<()> {
        for s in &plan.served {
            write_container_files(s)?;
        }
        self.prepare_lock_dir();
        Ok(())
    }

    fn prepare_lock_dir(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        if let Some(lock) = &self.lock_dir {
            // Best effort, as HAMi: the mount fails visibly if it is missing.
            let made = std::fs::create_dir_all(lock).and_then(|()| {
                std::fs::set_permissions(lock, std::fs::Permissions::from_mode(0o777))
            });
            if let Err(e) = made {
                tracing::warn!("preparing {}: {e}", lock.display());
            }
        }
    }
}

/// The host side of one served container: a fresh per-container dir
/// (world-writable, as HAMi makes it: the container's user is not known
/// here), and a fresh limits dir (0755, the container mounts it read-only)
/// holding the limits file (0444), the `cards` file and, with `--sim`, the
/// container's simulated cards.
pub fn write_container_files(s: &Served) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let ctx = |what: &str, p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    let fresh = |dir: &Path, mode: u32| -> std::io::Result<()> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ctx("removing", dir, e)),
        }
        std::fs::create_dir_all(dir).map_err(|e| ctx("creating", dir, e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| ctx("chmod", dir, e))
    };
    {
        fresh(&s.host_dir, 0o777)?;
        fresh(&s.limits_dir, 0o755)?;
        let file = s.limits_dir.join(allocate::LIMITS_FILE_NAME);
        // The region path the container's processes see, for those
        // started without the container's environment.
        let region = s.response.envs.get(allocate::SHARED_CACHE).map(Path::new);
        match region {
            Some(r) => hami_shm::limits::write_for_container(
                &file,
                &s.limits,
                r,
                &allocate::card_uuids(&s.devices),
            ),
            None => hami_shm::limits::write(&file, &s.limits),
        }
        .map_err(|e| ctx("writing", &file, e))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444))
            .map_err(|e| ctx("chmod", &file, e))?;
        let cards: String = s.devices.iter().map(|d| format!("{}\n", d.uuid)).collect();
        let file = s.limits_dir.join(allocate::CARDS_FILE_NAME);
        std::fs::write(&file, cards).map_err(|e| ctx("writing", &file, e))?;
        if let Some(devices) = &s.sim_devices {
            let file = s.limits_dir.join(allocate::SIM_DEVICES_FILE_NAME);
            std::fs::write(&file, devices).map_err(|e| ctx("writing", &file, e))?;
        }
    }
    Ok(())
}

/// Binds a unix socket at `path`, removing a stale socket file first.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("removing stale socket {}: {e}", path.display()),
            ));
        }
    }
    UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {}: {e}", path.display())))
}

/// A random (version 4) UUID, as HAMi names shared-cache files.
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Unique enough for a file name: time and pid.
        let t = jiff::Timestamp::now().as_nanosecond() as u128;
        b = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

type DeviceStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<proto::ListAndWatchResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    async fn get_device_plugin_options(
        &self,
        _: Request<proto::Empty>,
    ) -> Result<Response<proto::DevicePluginOptions>, Status> {
        Ok(Response::new(self.options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<proto::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let numa = self.numa_topology;
        // The current list at once, then every change.
        let stream = WatchStream::new(self.cards.clone()).map(move |cards| {
            Ok(proto::ListAndWatchResponse {
                devices: plugin_devices(&cards, numa),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<proto::PreferredAllocationRequest>,
    ) -> Result<Response<proto::PreferredAllocationResponse>, Status> {
        // Never an error: the kubelet would fail the pod; without an
        // answer it chooses by itself.
        Ok(Response::new(self.preferred(request.into_inner()).await))
    }

    async fn allocate(
        &self,
        request: Request<proto::AllocateRequest>,
    ) -> Result<Response<proto::AllocateResponse>, Status> {
        self.run_allocate(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn pre_start_container(
        &self,
        request: Request<proto::PreStartContainerRequest>,
    ) -> Result<Response<proto::PreStartContainerResponse>, Status> {
        if let Some(lf) = &self.lock_free {
            self.prestart(lf, request.into_inner().devices_ids).await?;
        }
        Ok(Response::new(proto::PreStartContainerResponse {}))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_version_4_and_differ() {
        let a = super::random_uuid();
        let b = super::random_uuid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
    }
}
