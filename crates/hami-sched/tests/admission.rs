//! The webhook's rules (spec section 5), through `Engine::admit` and
//! `vendor::nvidia::admit`.

mod common;

use common::*;
use hami_api::NvidiaConfig;
use hami_api::annotations::SCHEDULER_NAME;
use hami_api::config::GpuCorePolicy;
use hami_sched::vendor::nvidia;
use hami_sched::{Admission, Policies};
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};

fn admit(pod: &mut Pod) -> Admission {
    engine().admit(pod, SCHEDULER_NAME)
}

fn admit_with(config: NvidiaConfig, pod: &mut Pod) -> Admission {
    // Both entry points apply the same rules.
    let mut copy = pod.clone();
    let a = nvidia::admit(&config, &mut copy, SCHEDULER_NAME);
    let b = engine_with(config, Policies::default()).admit(pod, SCHEDULER_NAME);
    assert_eq!(a, b);
    assert_eq!(&copy, pod);
    b
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
    let mut bare = Pod::default();
    assert_eq!(admit(&mut bare), Admission::Untouched);
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
    // Out of range is denied with the rule.
    let mut p = gpu_pod("p", &[(GPU, "1"), (PRIO, "5")]);
    let Admission::Denied(why) = admit(&mut p) else {
        panic!("priority 5 admitted")
    };
    assert!(why.contains("nvidia.com/priority=5"), "{why}");
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
