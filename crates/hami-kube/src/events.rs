//! Kubernetes events about pods (`BindingFailed`, `FilteringFailed`, ...),
//! written as core/v1 Events so that `kubectl describe pod` shows them.

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use crate::clock::Clock;
use crate::{Error, Result};

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Normal,
    Warning,
}

/// Writes events on behalf of one component.
#[derive(Clone)]
pub struct EventWriter {
    client: Client,
    component: String,
    instance: String,
}

impl EventWriter {
    pub fn new(client: Client, component: &str, instance: &str) -> EventWriter {
        EventWriter {
            client,
            component: component.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Records `reason` with a message on a pod.
    pub async fn pod_event(
        &self,
        pod: &Pod,
        severity: Severity,
        reason: &str,
        message: &str,
        clock: &dyn Clock,
    ) -> Result<()> {
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name_any()),
            namespace: Some(namespace.clone()),
            uid: pod.metadata.uid.clone(),
            resource_version: pod.metadata.resource_version.clone(),
            ..Default::default()
        };
        self.publish(&namespace, reference, severity, reason, message, clock)
            .await
    }

    async fn publish(
        &self,
        namespace: &str,
        involved: ObjectReference,
        severity: Severity,
        reason: &str,
        message: &str,
        clock: &dyn Clock,
    ) -> Result<()> {
        let now = clock.now();
        let name = involved.name.clone().unwrap_or_default();
        // Kubernetes caps event messages at 1 KiB.
        let message: String = message.chars().take(1000).collect();
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{name}.")),
                namespace: Some(namespace.to_string()),
                ..Default::default()
            },
            involved_object: involved,
            reason: Some(reason.to_string()),
            message: Some(message),
            type_: Some(
                match severity {
                    Severity::Normal => "Normal",
                    Severity::Warning => "Warning",
                }
                .into(),
            ),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            event_time: Some(MicroTime(now)),
            count: Some(1),
            action: Some(reason.to_string()),
            reporting_component: Some(self.component.clone()),
            reporting_instance: Some(self.instance.clone()),
            source: Some(EventSource {
                component: Some(self.component.clone()),
                host: None,
            }),
            ..Default::default()
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        events
            .create(&PostParams::default(), &event)
            .await
            .map_err(|e| Error::api(format!("create event {reason} for {namespace}/{name}"), e))?;
        Ok(())
    }
}
