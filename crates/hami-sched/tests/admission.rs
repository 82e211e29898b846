//! The webhook's rules (spec section 5), through `Engine::admit` and
//! `vendor::nvidia::admit`.

mod common;

use common::*;
use hami_api::NvidiaConfig;
use hami_api::annotations::{self as ann, SCHEDULER_NAME};
use hami_api::config::GpuCorePolicy;
use hami_sched::{Admission, AdmissionOptions, Engine, Policies, ProtectedEnvMode};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, EphemeralContainer, ObjectFieldSelector, Pod, SecurityContext,
};

fn admit(pod: &mut Pod) -> Admission {
    engine().admit(pod, SCHEDULER_NAME)
}

fn admit_with(config: NvidiaConfig, pod: &mut Pod) -> Admission {
    engine_with(config, Policies::default()).admit(pod, SCHEDULER_NAME)
}

fn admit_opts(options: AdmissionOptions, pod: &mut Pod) -> Admission {
    Engine::default()
        .with_admission(options)
        .admit(pod, SCHEDULER_NAME)
}

fn denied(a: Admission) -> String {
    match a {
        Admission::Denied(why) => why,
        other => panic!("admitted: {other:?}"),
    }
}

fn with_env(mut p: Pod, i: usize, vars: &[(&str, &str)]) -> Pod {
    p.spec.as_mut().unwrap().containers[i].env = Some(
        vars.iter()
            .map(|(k, v)| EnvVar {
                name: k.to_string(),
                value: Some(v.to_string()),
                value_from: None,
            })
            .collect(),
    );
    p
}

fn ctr(p: &Pod, i: usize) -> &Container {
    &p.spec.as_ref().unwrap().containers[i]
}

fn limit(c: &Container, name: &str) -> Option<String> {
    c.resources
        .as_ref()?
        .limits
        .as_ref()?
        .get(name)
        .map(|q| q.0.clone())
}

fn env(c: &Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn scheduler(p: &Pod) -> Option<&str> {
    p.spec.as_ref().unwrap().scheduler_name.as_deref()
}

/// Admits a one-container pod with `kv` and returns its limits afterwards.
fn limits_after(kv: &[(&str, &str)]) -> (Option<String>, Option<String>) {
    let mut p = gpu_pod("p", kv);
    assert_eq!(admit(&mut p), Admission::Mutated, "{kv:?}");
    (limit(ctr(&p, 0), GPU), limit(ctr(&p, 0), CORES))
}

#[test]
fn gpu_pods_are_sent_to_our_scheduler() {
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "1000"), (CORES, "30")]);
    assert_eq!(admit(&mut p), Admission::Mutated);
    assert_eq!(scheduler(&p), Some("hami-scheduler"));
    // Explicitly default-scheduler, or already ours: still ours.
    for name in ["default-scheduler", "hami-scheduler"] {
        let mut p = pod("p")
            .ctr(&[(GPU, "1"), (MEM, "10")])
            .scheduler(name)
            .build();
        assert_eq!(admit(&mut p), Admission::Mutated);
        assert_eq!(scheduler(&p), Some("hami-scheduler"));
    }
}

#[test]
fn a_renamed_scheduler_claims_gpu_pods_under_its_own_name() {
    let e = engine();
    // GPU pods of the default scheduler, and pods already naming ours, go
    // to the configured name; the stock name is then another scheduler's.
    for name in [None, Some("default-scheduler"), Some("gpu-sched")] {
        let mut b = pod("p").ctr(&[(GPU, "1"), (MEM, "10")]);
        if let Some(n) = name {
            b = b.scheduler(n);
        }
        let mut p = b.build();
        assert_eq!(e.admit(&mut p, "gpu-sched"), Admission::Mutated, "{name:?}");
        assert_eq!(scheduler(&p), Some("gpu-sched"));
    }
    let mut p = pod("p")
        .ctr(&[(GPU, "1")])
        .scheduler("hami-scheduler")
        .build();
    assert_eq!(e.admit(&mut p, "gpu-sched"), Admission::Untouched);
    // Denials name the scheduler that must place the pod.
    let mut p = pod("p").ctr(&[(GPU, "1")]).build();
    p.spec.as_mut().unwrap().node_name = Some("n1".into());
    match e.admit(&mut p, "gpu-sched") {
        Admission::Denied(why) => assert!(why.contains("placed by gpu-sched"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn other_schedulers_and_plain_pods_are_untouched() {
    let mut p = pod("p")
        .ctr(&[(GPU, "1")])
        .privileged()
        .scheduler("volcano")
        .build();
    let before = p.clone();
    assert_eq!(admit(&mut p), Admission::Untouched);
    assert_eq!(p, before, "not even the exclusive default or a denial");
    let mut p = pod("p").ctr(&[("cpu", "1")]).ctr(&[]).build();
    let before = p.clone();
    assert_eq!(admit(&mut p), Admission::Untouched);
    assert_eq!(p, before);
}

#[test]
fn priority_becomes_cuda_task_priority() {
    let mut p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "10"), (PRIO, "0")])
        .ctr(&[(GPU, "1"), (MEM, "10"), (PRIO, "1")])
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .build();
    assert_eq!(admit(&mut p), Admission::Mutated);
    assert_eq!(env(ctr(&p, 0), "CUDA_TASK_PRIORITY").as_deref(), Some("0"));
    assert_eq!(env(ctr(&p, 1), "CUDA_TASK_PRIORITY").as_deref(), Some("1"));
    assert_eq!(env(ctr(&p, 2), "CUDA_TASK_PRIORITY"), None);
    // A value the user set is replaced, not duplicated.
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "10"), (PRIO, "0")]);
    p.spec.as_mut().unwrap().containers[0].env = Some(vec![EnvVar {
        name: "CUDA_TASK_PRIORITY".into(),
        value: Some("7".into()),
        value_from: None,
    }]);
    admit(&mut p);
    let vars = ctr(&p, 0).env.as_ref().unwrap();
    assert_eq!(vars.len(), 1);
    assert_eq!(vars[0].value.as_deref(), Some("0"));
    // Beyond what the interposer can read is denied with the rule.
    let mut p = gpu_pod("p", &[(GPU, "1"), (PRIO, "4294967296")]);
    let why = denied(admit(&mut p));
    assert!(why.contains("nvidia.com/priority=4294967296"), "{why}");
}

#[test]
fn any_priority_value_is_passed_on_as_hami_does() {
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "10"), (PRIO, "5")]);
    assert_eq!(admit(&mut p), Admission::Mutated);
    assert_eq!(env(ctr(&p, 0), "CUDA_TASK_PRIORITY").as_deref(), Some("5"));
}

#[test]
fn core_utilization_policy_env_only_when_not_default() {
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "10")]);
    admit(&mut p);
    assert_eq!(env(ctr(&p, 0), "GPU_CORE_UTILIZATION_POLICY"), None);
    for (policy, word) in [
        (GpuCorePolicy::Force, "force"),
        (GpuCorePolicy::Disable, "disable"),
    ] {
        let config = NvidiaConfig {
            gpu_core_policy: policy,
            ..Default::default()
        };
        let mut p = pod("p")
            .ctr(&[(GPU, "1"), (MEM, "10")])
            .ctr(&[("cpu", "1")])
            .build();
        assert_eq!(admit_with(config, &mut p), Admission::Mutated);
        assert_eq!(
            env(ctr(&p, 0), "GPU_CORE_UTILIZATION_POLICY").as_deref(),
            Some(word)
        );
        // Containers without GPUs get nothing.
        assert_eq!(env(ctr(&p, 1), "GPU_CORE_UTILIZATION_POLICY"), None);
    }
}

#[test]
fn default_gpu_num_is_added_when_only_memory_or_cores_are_given() {
    assert_eq!(limits_after(&[(MEM, "3000")]), (Some("1".into()), None));
    assert_eq!(
        limits_after(&[(CORES, "30")]),
        (Some("1".into()), Some("30".into()))
    );
    assert_eq!(limits_after(&[(PCT, "50")]), (Some("1".into()), None));
    let config = NvidiaConfig {
        default_gpu_num: 2,
        ..Default::default()
    };
    let mut p = gpu_pod("p", &[(MEM, "3000")]);
    admit_with(config.clone(), &mut p);
    assert_eq!(limit(ctr(&p, 0), GPU).as_deref(), Some("2"));
    // The engine then sees two cards.
    let e = engine_with(config, Policies::default());
    assert_eq!(request(&e, &p).total_cards(), 2);
    // An explicit count is kept.
    assert_eq!(
        limits_after(&[(GPU, "3"), (MEM, "10")]).0.as_deref(),
        Some("3")
    );
}

#[test]
fn default_gpu_num_zero_adds_nothing() {
    let config = NvidiaConfig {
        default_gpu_num: 0,
        ..Default::default()
    };
    let mut p = gpu_pod("p", &[(MEM, "3000")]);
    admit_with(config.clone(), &mut p);
    assert_eq!(limit(ctr(&p, 0), GPU), None);
    assert_eq!(limit(ctr(&p, 0), CORES), None);
    let mut p = gpu_pod("p", &[(PCT, "100")]);
    admit_with(config, &mut p);
    assert_eq!(limit(ctr(&p, 0), GPU), None);
    assert_eq!(
        limit(ctr(&p, 0), CORES),
        None,
        "no count, so no exclusive default"
    );
}

#[test]
fn exclusive_default_sets_gpucores_100() {
    let x = Some("100".to_string());
    // Count only: the whole card, exclusively.
    assert_eq!(limits_after(&[(GPU, "1")]).1, x);
    assert_eq!(limits_after(&[(GPU, "2")]).1, x);
    // The whole card's memory by percentage.
    assert_eq!(limits_after(&[(GPU, "1"), (PCT, "100")]).1, x);
    assert_eq!(
        limits_after(&[(GPU, "1"), (PCT, "100"), (MEM, "1000")]).1,
        x
    );
    // Only percentage 100: the count is added first, then the rule applies.
    assert_eq!(limits_after(&[(PCT, "100")]), (Some("1".into()), x.clone()));
    // A share of memory is not exclusive.
    assert_eq!(limits_after(&[(GPU, "1"), (PCT, "50")]).1, None);
    assert_eq!(limits_after(&[(GPU, "1"), (MEM, "1000")]).1, None);
    assert_eq!(limits_after(&[(MEM, "1000")]).1, None);
    // Cores given are kept, including 0.
    assert_eq!(
        limits_after(&[(GPU, "1"), (CORES, "30")]).1.as_deref(),
        Some("30")
    );
    assert_eq!(
        limits_after(&[(GPU, "1"), (CORES, "0")]).1.as_deref(),
        Some("0")
    );
    // Given as a request rather than a limit, the count still counts.
    let mut p = gpu_pod("p", &[]);
    p.spec.as_mut().unwrap().containers[0].resources =
        Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: limits(&[(GPU, "1")]).unwrap().limits,
            ..Default::default()
        });
    assert_eq!(admit(&mut p), Admission::Mutated);
    assert_eq!(limit(ctr(&p, 0), CORES), x);
}

#[test]
fn exclusive_default_makes_the_pod_exclusive_when_scheduled() {
    let e = engine();
    let mut s = snapshot(&e, &[node("n1", &[t4("GPU-a")])]);
    let mut whole = gpu_pod("whole", &[(GPU, "1")]);
    e.admit(&mut whole, SCHEDULER_NAME);
    let out = place(&e, &mut s, &whole);
    assert_eq!(out.devices.0[0][0].cores, 100);
    let mut small = gpu_pod("small", &[(GPU, "1"), (MEM, "10")]);
    e.admit(&mut small, SCHEDULER_NAME);
    assert_eq!(decide(&e, &s, &small).node, None);
}

#[test]
fn init_containers_are_admitted_too() {
    let mut p = pod("p").init(&[(MEM, "100")]).ctr(&[("cpu", "1")]).build();
    assert_eq!(admit(&mut p), Admission::Mutated);
    let init = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(limit(init, GPU).as_deref(), Some("1"));
    assert_eq!(scheduler(&p), Some("hami-scheduler"));
}

#[test]
fn privileged_gpu_containers_are_denied_with_a_reason() {
    let mut p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .privileged()
        .build();
    let Admission::Denied(why) = admit(&mut p) else {
        panic!("privileged admitted")
    };
    assert!(why.contains("privileged"), "{why}");
    assert!(why.contains("\"c0\""), "names the container: {why}");
    assert!(why.contains("nvidia.com/gpu"), "names the resource: {why}");
    // Privileged without GPUs is none of our business.
    let mut p = pod("p").ctr(&[("cpu", "1")]).privileged().build();
    assert_eq!(admit(&mut p), Admission::Untouched);
}

#[test]
fn node_name_is_denied_for_gpu_pods() {
    let mut p = pod("p").ctr(&[(GPU, "1")]).node_name("n1").build();
    let Admission::Denied(why) = admit(&mut p) else {
        panic!("nodeName admitted")
    };
    assert!(why.contains("nodeName") && why.contains("n1"), "{why}");
    let mut p = pod("p").ctr(&[("cpu", "1")]).node_name("n1").build();
    assert_eq!(admit(&mut p), Admission::Untouched);
}

#[test]
fn memory_percentage_above_100_is_denied() {
    for kv in [&[(GPU, "1"), (PCT, "101")][..], &[(PCT, "140")][..]] {
        let mut p = gpu_pod("p", kv);
        let Admission::Denied(why) = admit(&mut p) else {
            panic!("{kv:?} admitted")
        };
        assert!(why.contains("nvidia.com/gpumem-percentage=1"), "{why}");
        assert!(why.contains("0-100"), "{why}");
    }
    let mut p = gpu_pod("p", &[(GPU, "1"), (PCT, "1.5")]);
    assert!(matches!(admit(&mut p), Admission::Denied(_)));
    assert_eq!(
        limits_after(&[(GPU, "1"), (PCT, "0")]).0.as_deref(),
        Some("1")
    );
}

#[test]
fn runtime_class_is_set_when_configured() {
    let config = NvidiaConfig {
        runtime_class_name: "nvidia".into(),
        ..Default::default()
    };
    let mut p = gpu_pod("p", &[(GPU, "1")]);
    admit_with(config.clone(), &mut p);
    assert_eq!(
        p.spec.as_ref().unwrap().runtime_class_name.as_deref(),
        Some("nvidia")
    );
    // Not configured: left alone.
    let mut p = gpu_pod("p", &[(GPU, "1")]);
    admit(&mut p);
    assert_eq!(p.spec.as_ref().unwrap().runtime_class_name, None);
    // A pod without GPUs is not given one.
    let mut p = pod("p").ctr(&[("cpu", "1")]).build();
    assert_eq!(admit_with(config.clone(), &mut p), Admission::Untouched);
    assert_eq!(p.spec.as_ref().unwrap().runtime_class_name, None);
    // The user's own choice wins.
    let mut p = gpu_pod("p", &[(GPU, "1")]);
    p.spec.as_mut().unwrap().runtime_class_name = Some("kata".into());
    admit_with(config, &mut p);
    assert_eq!(
        p.spec.as_ref().unwrap().runtime_class_name.as_deref(),
        Some("kata")
    );
}

#[test]
fn admission_is_idempotent() {
    let mut p = pod("p")
        .init(&[(GPU, "1")])
        .ctr(&[(MEM, "3000"), (PRIO, "0")])
        .ctr(&[(GPU, "2"), (PCT, "100")])
        .build();
    assert_eq!(admit(&mut p), Admission::Mutated);
    let once = p.clone();
    assert_eq!(admit(&mut p), Admission::Mutated);
    assert_eq!(p, once);
}

#[test]
fn a_privileged_container_anywhere_denies_a_gpu_pod() {
    let privileged = Some(SecurityContext {
        privileged: Some(true),
        ..Default::default()
    });
    // A privileged sidecar without GPUs next to a GPU container.
    let mut p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .ctr(&[("cpu", "1")])
        .privileged()
        .build();
    let why = denied(admit(&mut p));
    assert!(why.contains("\"c1\" is privileged"), "{why}");
    assert!(why.contains("nvidia.com/gpu"), "{why}");
    // A privileged init container.
    let mut p = pod("p")
        .init(&[("cpu", "1")])
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .build();
    p.spec.as_mut().unwrap().init_containers.as_mut().unwrap()[0].security_context =
        privileged.clone();
    assert!(denied(admit(&mut p)).contains("\"init0\" is privileged"));
    // A privileged ephemeral container.
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "10")]);
    p.spec.as_mut().unwrap().ephemeral_containers = Some(vec![EphemeralContainer {
        name: "debug".into(),
        security_context: privileged,
        ..Default::default()
    }]);
    assert!(denied(admit(&mut p)).contains("\"debug\" is privileged"));
}

#[test]
fn a_pod_without_containers_is_denied() {
    for mut p in [Pod::default(), pod("p").build()] {
        let why = denied(admit(&mut p));
        assert!(why.contains("no containers"), "{why}");
    }
}

#[test]
fn overwrite_env_hides_the_gpus_from_containers_without_a_request() {
    let config = NvidiaConfig {
        overwrite_env: true,
        ..Default::default()
    };
    let mut p = pod("p")
        .init(&[("cpu", "1")])
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .ctr(&[("cpu", "1")])
        .build();
    p = with_env(p, 1, &[("NVIDIA_VISIBLE_DEVICES", "all")]);
    assert_eq!(admit_with(config.clone(), &mut p), Admission::Mutated);
    let init = &p.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0];
    assert_eq!(env(init, "NVIDIA_VISIBLE_DEVICES").as_deref(), Some("none"));
    assert_eq!(env(ctr(&p, 0), "NVIDIA_VISIBLE_DEVICES"), None);
    assert_eq!(
        env(ctr(&p, 1), "NVIDIA_VISIBLE_DEVICES").as_deref(),
        Some("none")
    );
    // A pod without any GPU request is changed too; off by default.
    let mut p = pod("p").ctr(&[("cpu", "1")]).build();
    assert_eq!(admit_with(config, &mut p), Admission::Mutated);
    assert_eq!(
        env(ctr(&p, 0), "NVIDIA_VISIBLE_DEVICES").as_deref(),
        Some("none")
    );
    let mut p = pod("p").ctr(&[("cpu", "1")]).build();
    assert_eq!(admit(&mut p), Admission::Untouched);
}

#[test]
fn without_force_overwrite_default_scheduler_pods_keep_the_default() {
    let keep = AdmissionOptions {
        force_overwrite_default_scheduler: false,
        ..Default::default()
    };
    for name in [None, Some("default-scheduler")] {
        let mut b = pod("p").ctr(&[(GPU, "1"), (MEM, "10")]);
        if let Some(n) = name {
            b = b.scheduler(n);
        }
        let mut p = b.build();
        let before = p.clone();
        assert_eq!(admit_opts(keep.clone(), &mut p), Admission::Untouched);
        assert_eq!(p, before, "{name:?}");
    }
    // Pods naming ours are still admitted.
    let mut p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .scheduler(SCHEDULER_NAME)
        .build();
    assert_eq!(admit_opts(keep, &mut p), Admission::Mutated);
}

#[test]
fn scheduler_written_annotations_are_removed_from_every_pod() {
    let forged = |b: common::PodB| {
        b.annotated("n1", "GPU-a,NVIDIA,1000,10:;")
            .ann(ann::VGPU_TIME, "1")
            .ann(ann::BIND_PHASE, "success")
            .ann(ann::BIND_TIME, "1")
            .ann("keep.me/too", "yes")
            .build()
    };
    let pods = [
        forged(pod("gpu").ctr(&[(GPU, "1"), (MEM, "10")])),
        forged(pod("cpu").ctr(&[("cpu", "1")])),
        forged(pod("other").ctr(&[(GPU, "1")]).scheduler("volcano")),
    ];
    for mut p in pods {
        assert_eq!(admit(&mut p), Admission::Mutated, "{:?}", p.metadata.name);
        let left: Vec<&String> = p.metadata.annotations.as_ref().unwrap().keys().collect();
        assert_eq!(left, ["keep.me/too"], "{:?}", p.metadata.name);
    }
}

#[test]
fn gpu_containers_may_not_switch_the_interposer_off() {
    for var in [
        "CUDA_DISABLE_CONTROL",
        "HAMI_LIMITS_FILE",
        "CUDA_DEVICE_MEMORY_SHARED_CACHE",
        "HAMI_REAL_LIBCUDA",
        "HAMI_REAL_LIBNVML",
        "CUDA_OVERSUBSCRIBE",
        "GPU_CORE_UTILIZATION_POLICY",
        "CUDA_DEVICE_MEMORY_LIMIT",
        "CUDA_DEVICE_MEMORY_LIMIT_3",
        "CUDA_DEVICE_SM_LIMIT",
        "CUDA_DEVICE_SM_LIMIT_0",
    ] {
        let mut p = with_env(gpu_pod("p", &[(GPU, "1"), (MEM, "10")]), 0, &[(var, "1")]);
        let why = denied(admit(&mut p));
        assert!(
            why.contains(&format!("container \"c0\" sets {var}")),
            "{why}"
        );
    }
    // Through valueFrom the name is what counts.
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "10")]);
    p.spec.as_mut().unwrap().containers[0].env = Some(vec![EnvVar {
        name: "CUDA_DISABLE_CONTROL".into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }]);
    assert!(denied(admit(&mut p)).contains("CUDA_DISABLE_CONTROL"));
    // Containers without GPUs, and other variables, are left alone.
    let mut p = pod("p")
        .ctr(&[(GPU, "1"), (MEM, "10")])
        .ctr(&[("cpu", "1")])
        .build();
    p = with_env(p, 1, &[("CUDA_DISABLE_CONTROL", "true")]);
    p = with_env(p, 0, &[("CUDA_VISIBLE_DEVICES", "0")]);
    assert_eq!(admit(&mut p), Admission::Mutated);
}

#[test]
fn protected_env_can_be_removed_or_allowed_per_namespace() {
    let vars = [
        ("CUDA_DEVICE_SM_LIMIT", "100"),
        ("KEEP", "1"),
        ("CUDA_DISABLE_CONTROL", "true"),
    ];
    let remove = AdmissionOptions {
        protected_env_mode: ProtectedEnvMode::Remove,
        ..Default::default()
    };
    let mut p = with_env(gpu_pod("p", &[(GPU, "1"), (MEM, "10")]), 0, &vars);
    assert_eq!(admit_opts(remove, &mut p), Admission::Mutated);
    let names: Vec<&str> = ctr(&p, 0)
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["KEEP"]);
    let allowed = AdmissionOptions {
        protected_env_namespaces: vec!["gpu-debug".into()],
        ..Default::default()
    };
    let mut p = with_env(
        pod("p")
            .ns("gpu-debug")
            .ctr(&[(GPU, "1"), (MEM, "10")])
            .build(),
        0,
        &vars,
    );
    assert_eq!(admit_opts(allowed.clone(), &mut p), Admission::Mutated);
    assert_eq!(ctr(&p, 0).env.as_ref().unwrap().len(), 3);
    let mut p = with_env(gpu_pod("p", &[(GPU, "1"), (MEM, "10")]), 0, &vars);
    assert!(denied(admit_opts(allowed, &mut p)).contains("namespace \"default\""));
}

#[test]
fn the_core_policy_the_webhook_writes_is_not_the_users() {
    let config = NvidiaConfig {
        gpu_core_policy: GpuCorePolicy::Force,
        ..Default::default()
    };
    let mut p = gpu_pod("p", &[(GPU, "1"), (MEM, "10")]);
    assert_eq!(admit_with(config.clone(), &mut p), Admission::Mutated);
    // Admitting again (a re-invoked webhook) keeps it.
    assert_eq!(admit_with(config.clone(), &mut p), Admission::Mutated);
    // Another value is the user's.
    let mut p = with_env(
        gpu_pod("p", &[(GPU, "1"), (MEM, "10")]),
        0,
        &[("GPU_CORE_UTILIZATION_POLICY", "disable")],
    );
    // The webhook's own value replaces it before the check: the pod keeps
    // the configured policy.
    assert_eq!(admit_with(config, &mut p), Admission::Mutated);
    assert_eq!(
        env(ctr(&p, 0), "GPU_CORE_UTILIZATION_POLICY").as_deref(),
        Some("force")
    );
}
