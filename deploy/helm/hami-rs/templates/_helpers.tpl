{{/*
Names
*/}}

{{/* app.kubernetes.io/name of every object. */}}
{{- define "hami-rs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Prefix of every object name. The base is "hami", not the chart's name, so
that a release named "hami" gets HAMi's object names (hami-scheduler,
hami-scheduler-device, ...) and HAMi's docs, dashboards and
kubectl habits keep working.
*/}}
{{- define "hami-rs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $base := default "hami" .Values.nameOverride -}}
{{- if contains $base .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $base | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "hami-rs.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{- define "hami-rs.scheduler.fullname" -}}
{{- printf "%s-scheduler" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.scheduler.deviceConfigMap" -}}
{{- printf "%s-scheduler-device" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.scheduler.tlsSecret" -}}
{{- printf "%s-scheduler-tls" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.scheduler.certificate" -}}
{{- printf "%s-scheduler-serving-cert" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.scheduler.issuer" -}}
{{- printf "%s-scheduler-selfsigned-issuer" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.webhook.fullname" -}}
{{- printf "%s-webhook" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.certgen.fullname" -}}
{{- printf "%s-certgen" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.node.fullname" -}}
{{- printf "%s-node" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.node.monitorService" -}}
{{- printf "%s-node-monitor" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.policy.fullname" -}}
{{- printf "%s-allocation-annotations" (include "hami-rs.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels. Call with (dict "root" $ "component" "scheduler").
*/}}

{{- define "hami-rs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hami-rs.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hami-rs.labels" -}}
{{ include "hami-rs.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .root.Values.global.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Images
*/}}

{{/*
One of our images. HAMi's image keys (global.imageTag,
scheduler.extender.image, devicePlugin.image ...) name HAMi's Go images and
are not read; global.imageRegistry is, because it names a mirror of every
image of the release, as in HAMi.
Call with (dict "root" $ "repository" "hami-rs/hami-node").
*/}}
{{- define "hami-rs.image" -}}
{{- $v := .root.Values -}}
{{- $registry := default $v.images.registry $v.global.imageRegistry -}}
{{- $tag := default .root.Chart.AppVersion $v.images.tag | toString -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "hami-rs.scheduler.image" -}}
{{- include "hami-rs.image" (dict "root" . "repository" .Values.images.scheduler.repository) -}}
{{- end -}}

{{- define "hami-rs.node.image" -}}
{{- include "hami-rs.image" (dict "root" . "repository" .Values.images.node.repository) -}}
{{- end -}}

{{/*
The cluster's own version without build or vendor suffixes:
v1.30.4+k3s1 -> v1.30.4, v1.29.8-eks-abc -> v1.29.8. registry.k8s.io
publishes only the plain tags.
*/}}
{{- define "hami-rs.kubeVersionTag" -}}
{{- regexFind "^v[0-9]+\\.[0-9]+\\.[0-9]+" .Capabilities.KubeVersion.Version -}}
{{- end -}}

{{/*
kube-scheduler runs at the cluster's own version unless a tag is given: its
config API and the extender protocol must match the API server's.
*/}}
{{- define "hami-rs.kubeScheduler.image" -}}
{{- $img := .Values.scheduler.kubeScheduler.image -}}
{{- $registry := default (default "registry.k8s.io" $img.registry) .Values.global.imageRegistry -}}
{{- $repository := default "kube-scheduler" $img.repository -}}
{{- $tag := default (include "hami-rs.kubeVersionTag" .) ($img.tag | toString | trim) -}}
{{- if not $tag -}}
{{- fail (printf "cannot derive kube-scheduler's tag from the Kubernetes version %q: set scheduler.kubeScheduler.image.tag" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) $repository $tag -}}
{{- end -}}

{{/*
imagePullSecrets of a pod. Entries may be names or {name: ...} maps (HAMi
uses names). Call with (dict "root" $ "extra" (list ...)).
*/}}
{{- define "hami-rs.imagePullSecrets" -}}
{{- $names := list -}}
{{- $all := concat (.root.Values.global.imagePullSecrets | default list) (.root.Values.images.pullSecrets | default list) (.extra | default list) -}}
{{- range $all -}}
{{- if kindIs "map" . -}}
{{- $names = append $names .name -}}
{{- else if . -}}
{{- $names = append $names (toString .) -}}
{{- end -}}
{{- end -}}
{{- with ($names | uniq) }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Scheduler settings shared by several objects
*/}}

{{/*
Leader election is needed as soon as two kube-schedulers could run at once:
more than one replica, and also the surge pod of a rolling update (which is
why HAMi's default, on, is kept). hami-scheduler follows kube-scheduler's
Lease, so without kube-scheduler in the pod there is nothing to follow.
*/}}
{{/*
kube-scheduler's leader Lease. Not HAMi's name (its schedulerName): HAMi's
kube-scheduler leaves that Lease behind on uninstall, and the chart owns
this one (uninstall removes it), so the two must not collide.
*/}}
{{- define "hami-rs.leaseName" -}}
{{- printf "%s-leader" (include "hami-rs.scheduler.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hami-rs.leaderElect" -}}
{{- $s := .Values.scheduler -}}
{{- if and $s.kubeScheduler.enabled (or (gt (int $s.replicas) 1) $s.leaderElect) -}}
true
{{- else -}}
false
{{- end -}}
{{- end -}}

{{/* Port of hami-scheduler's plain-HTTP metrics/probe listener, from HAMi's scheduler.metricsBindAddress (":9395"). */}}
{{- define "hami-rs.scheduler.metricsPort" -}}
{{- $p := regexFind "[0-9]+$" (toString (default ":9395" .Values.scheduler.metricsBindAddress)) -}}
{{- default "9395" $p -}}
{{- end -}}

{{/* kube-scheduler's extender httpTimeout; hami-scheduler is told the same so its lock takeover waits long enough. */}}
{{- define "hami-rs.extenderHTTPTimeout" -}}
30s
{{- end -}}

{{/* The names in the serving certificate: the Service as the API server may call it, 127.0.0.1 for kube-scheduler. */}}
{{- define "hami-rs.certDNSNames" -}}
{{- $svc := include "hami-rs.scheduler.fullname" . -}}
{{- $ns := include "hami-rs.namespace" . -}}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) -}}
{{- $custom := .Values.scheduler.admissionWebhook.customURL | default dict -}}
{{- if and $custom.enabled $custom.host (not (regexMatch "^[0-9.]+$|:" (toString $custom.host))) -}}
{{- $names = append $names (toString $custom.host) -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{- define "hami-rs.certIPAddresses" -}}
{{- $ips := list "127.0.0.1" -}}
{{- $custom := .Values.scheduler.admissionWebhook.customURL | default dict -}}
{{- if and $custom.enabled $custom.host (regexMatch "^[0-9.]+$|:" (toString $custom.host)) -}}
{{- $ips = append $ips (toString $custom.host) -}}
{{- end -}}
{{- join "," ($ips | uniq) -}}
{{- end -}}

{{/* HAMi writes some booleans as strings ("false"); device-config.yaml wants YAML booleans. */}}
{{- define "hami-rs.bool" -}}
{{- if eq (toString .) "true" -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/*
device-config.yaml, the key of the <fullname>-scheduler-device ConfigMap
read by hami-scheduler and hami-node. HAMi's device-config.content replaces
it whole. Only keys hami-rs's parser knows are written (docs/config.md):
HAMi's migProfileAllowlist, preConfiguredDeviceMemory, enableNumaTopology
and the other vendors' sections would only be warned about.
*/}}
{{- define "hami-rs.deviceConfig" -}}
{{- $content := "" -}}
{{- with (index .Values "device-config") -}}
{{- $content = .content | default "" -}}
{{- end -}}
{{- if $content -}}
{{ $content }}
{{- else -}}
{{- $dp := .Values.devicePlugin -}}
{{- $nv := dig "nvidia" dict (.Values.devices | default dict) -}}
nvidia:
  resourceCountName: {{ .Values.resourceName | quote }}
  resourceMemoryName: {{ .Values.resourceMem | quote }}
  resourceMemoryPercentageName: {{ .Values.resourceMemPercentage | quote }}
  resourceCoreName: {{ .Values.resourceCores | quote }}
  resourcePriorityName: {{ .Values.resourcePriority | quote }}
  overwriteEnv: {{ include "hami-rs.bool" .Values.scheduler.overwriteEnv }}
  defaultMemory: 0
  defaultCores: 0
  defaultGPUNum: 1
  deviceSplitCount: {{ int $dp.deviceSplitCount }}
  deviceMemoryScaling: {{ $dp.deviceMemoryScaling }}
  deviceCoreScaling: {{ $dp.deviceCoreScaling }}
  {{- with $nv.gpuCorePolicy }}
  gpuCorePolicy: {{ . | quote }}
  {{- end }}
  {{- if kindIs "invalid" $nv.libCudaLogLevel | not }}
  libCudaLogLevel: {{ int $nv.libCudaLogLevel }}
  {{- end }}
  {{- with $dp.migStrategy }}
  migStrategy: {{ . | quote }}
  {{- end }}
  disablecorelimit: {{ include "hami-rs.bool" $dp.disablecorelimit }}
  {{- with $dp.runtimeClassName }}
  runtimeClassName: {{ . | quote }}
  {{- end }}
{{- $ascend := dig "ascend" dict (.Values.devices | default dict) }}
{{- $overwrite := eq (include "hami-rs.bool" .Values.scheduler.overwriteEnv) "true" }}
{{- if or (hasKey $ascend "hamiVnpuCore") $ascend.runtimeClassName $overwrite }}
vnpus:
  {{- if hasKey $ascend "hamiVnpuCore" }}
  hamiVnpuCore: {{ include "hami-rs.bool" $ascend.hamiVnpuCore }}
  {{- end }}
  {{- with $ascend.runtimeClassName }}
  runtimeClassName: {{ . | quote }}
  {{- end }}
  {{- if $overwrite }}
  overwriteEnv: true
  {{- end }}
{{- end }}
{{- end -}}
{{- end -}}

{{/*
The KubeSchedulerConfiguration of the kube-scheduler container.
*/}}
{{- define "hami-rs.kubeSchedulerConfig" -}}
{{- $name := .Values.schedulerName -}}
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection:
  leaderElect: {{ include "hami-rs.leaderElect" . }}
  resourceNamespace: {{ include "hami-rs.namespace" . | quote }}
  resourceName: {{ include "hami-rs.leaseName" . | quote }}
profiles:
  - schedulerName: {{ $name | quote }}
extenders:
  # kube-scheduler shares the pod's network namespace with hami-scheduler,
  # and hami-scheduler answers the extender verbs only on loopback.
  - urlPrefix: {{ printf "https://127.0.0.1:%d" (int .Values.scheduler.httpsPort) | quote }}
    filterVerb: filter
    bindVerb: bind
    enableHTTPS: true
    tlsConfig:
      caFile: /tls/ca.crt
    nodeCacheCapable: true
    weight: 1
    httpTimeout: {{ include "hami-rs.extenderHTTPTimeout" . }}
    managedResources:
      {{- range include "hami-rs.managedResources" . | splitList "\n" }}
      - name: {{ . | quote }}
        ignoredByScheduler: true
      {{- end }}
{{- end -}}

{{/*
Node agent settings
*/}}

{{- define "hami-rs.hookPath" -}}
{{- trimSuffix "/" (default "/usr/local" .Values.global.gpuHookPath) -}}
{{- end -}}

{{- define "hami-rs.kubeletRootDir" -}}
{{- trimSuffix "/" (default "/var/lib/kubelet" .Values.kubeletRootDir) -}}
{{- end -}}

{{- define "hami-rs.nriSocket" -}}
{{- default "/var/run/nri/nri.sock" (dig "socketPath" "" (.Values.nri | default dict)) -}}
{{- end -}}

{{/*
NOTES.txt helpers
*/}}

{{/*
HAMi keys this chart accepts and does not use, present in the given values:
one line per reason, "reason: key, key, ...".
*/}}
{{- define "hami-rs.ignoredKeys" -}}
{{- $v := .Values -}}
{{- $groups := list
  (list "HAMi's images (ours are images.*)"
    "global.imageTag" "scheduler.extender.image" "scheduler.patch.image"
    "scheduler.patch.imageNew" "devicePlugin.image" "devicePlugin.monitor"
    "mockDevicePlugin")
  (list "settings of HAMi's Go binaries"
    "scheduler.extender.extraArgs" "scheduler.kubeScheduler.extraArgs"
    "scheduler.patch.runAsUser" "scheduler.service.httpTargetPort"
    "scheduler.service.monitorTargetPort" "devicePlugin.extraArgs"
    "devicePlugin.extraEnvs" "devicePlugin.securityContext" "devicePlugin.libPath"
    "devicePlugin.deviceListStrategy" "devicePlugin.passDeviceSpecsEnabled"
    "devicePlugin.nvidiaHookPath" "devicePlugin.nvidiaDriverRoot"
    "devicePlugin.gdrcopyEnabled" "devicePlugin.gdsEnabled" "devicePlugin.mofedEnabled")
  (list "features hami-rs does not have"
    "global.managedNodeSelectorEnable" "global.managedNodeSelector"
    "podSecurityPolicy" "legacyMetrics" "devicePlugin.gpuOperatorToolkitReady"
    "devicePlugin.preConfiguredDeviceMemory (set preconfigureddevicememory per node in devicePlugin.nodeConfiguration.config)")
-}}
{{- $lines := list -}}
{{- range $groups -}}
{{- $present := list -}}
{{- range rest . -}}
{{- $key := first (splitList " " .) -}}
{{- $cur := $v -}}
{{- $found := true -}}
{{- range splitList "." $key -}}
{{- if and $found (kindIs "map" $cur) (hasKey $cur .) -}}
{{- $cur = index $cur . -}}
{{- else -}}
{{- $found = false -}}
{{- end -}}
{{- end -}}
{{- if and $found (not (kindIs "invalid" $cur)) -}}
{{- $present = append $present . -}}
{{- end -}}
{{- end -}}
{{- if $present -}}
{{- $lines = append $lines (printf "%s: %s" (first .) (join ", " $present)) -}}
{{- end -}}
{{- end -}}
{{- $prefixes := list -}}
{{- range $k, $_ := $v -}}
{{- $m := regexFind "^(mlu|dcu|metax|enflame|kunlun|vastai|biren)" $k -}}
{{- if $m -}}
{{- $prefixes = append $prefixes (printf "%s*" $m) -}}
{{- end -}}
{{- end -}}
{{- if $prefixes -}}
{{- $lines = append $lines (printf "other vendors' resource names: %s" (join ", " ($prefixes | uniq))) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end -}}

{{/*
The resources kube-scheduler sends to the extender, as HAMi's chart lists
them: NVIDIA's, Cambricon's count, Hygon's and MetaX's always, and each
devices.<vendor>.customresources unless that vendor has enabled: false.
Cambricon's and Mthreads' memory and core resources are left to
kube-scheduler's own capacity check, as in HAMi.
*/}}
{{- define "hami-rs.managedResources" -}}
{{- $names := list .Values.resourceName .Values.resourceMem .Values.resourceMemPercentage .Values.resourceCores .Values.resourcePriority -}}
{{- $names = concat $names (list "cambricon.com/vmlu" "hygon.com/dcunum" "hygon.com/dcumem" "hygon.com/dcucores" "metax-tech.com/gpu" "metax-tech.com/sgpu" "metax-tech.com/vcore" "metax-tech.com/vmemory") -}}
{{- range $vendor, $cfg := (.Values.devices | default dict) -}}
{{- if and (ne $vendor "nvidia") (kindIs "map" $cfg) (ne (toString (dig "enabled" true $cfg)) "false") -}}
{{- $names = concat $names ($cfg.customresources | default list) -}}
{{- end -}}
{{- end -}}
{{- join "\n" ($names | uniq) -}}
{{- end -}}

{{/* Vendors other than NVIDIA that the values switch on (devices.<vendor>.enabled). */}}
{{- define "hami-rs.otherVendorsEnabled" -}}
{{- $on := list -}}
{{- range $vendor, $cfg := (.Values.devices | default dict) -}}
{{- if and (ne $vendor "nvidia") (kindIs "map" $cfg) $cfg.enabled -}}
{{- $on = append $on $vendor -}}
{{- end -}}
{{- end -}}
{{- join ", " $on -}}
{{- end -}}

{{/* Container securityContext of the non-root components. */}}
{{- define "hami-rs.restrictedContainer" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The hook Jobs make the certificate unless cert-manager does. */}}
{{- define "hami-rs.certgen.enabled" -}}
{{- if and .Values.scheduler.patch.enabled (not .Values.scheduler.certManager.enabled) -}}true{{- end -}}
{{- end -}}

{{/*
Hook annotations of the certificate Jobs' RBAC objects: they must exist
before either Job runs (lower weight) and are deleted after each phase.
*/}}
{{- define "hami-rs.certgen.rbacHook" -}}
helm.sh/hook: pre-install,pre-upgrade,post-install,post-upgrade
helm.sh/hook-weight: "-10"
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end -}}

{{/*
Pod spec of a certificate Job. Call with (dict "root" $ "name" "create" "args" (list ...)).
*/}}
{{- define "hami-rs.certgen.podSpec" -}}
{{- $p := .root.Values.scheduler.patch -}}
serviceAccountName: {{ include "hami-rs.certgen.fullname" .root }}
restartPolicy: OnFailure
{{- with $p.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- include "hami-rs.imagePullSecrets" (dict "root" .root) }}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  seccompProfile:
    type: RuntimeDefault
{{- with $p.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $p.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .name }}
    image: {{ include "hami-rs.scheduler.image" .root }}
    imagePullPolicy: {{ .root.Values.images.pullPolicy }}
    command: ["/usr/local/bin/hami-certgen"]
    args:
      {{- toYaml .args | nindent 6 }}
    securityContext:
      {{- include "hami-rs.restrictedContainer" .root | nindent 6 }}
{{- end -}}

{{/*
ValidatingAdmissionPolicy is GA (admissionregistration.k8s.io/v1) from 1.30.
Against a cluster Helm sees the kind itself; `helm template` knows only
group/versions, so there the version decides.
*/}}
{{- define "hami-rs.policy.enabled" -}}
{{- $served := or (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version) -}}
{{- if and .Values.admissionPolicy.enabled $served -}}true{{- end -}}
{{- end -}}

{{/* The node agent's node selector, for the notes. */}}
{{- define "hami-rs.nodeSelectorText" -}}
{{- $terms := list -}}
{{- range $k, $v := (.Values.devicePlugin.nvidiaNodeSelector | default dict) -}}
{{- $terms = append $terms (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- if $terms }}{{ join "," $terms }}{{ else }}(every node){{ end -}}
{{- end -}}

{{- define "hami-rs.nodeSelectorLabelArg" -}}
{{- $terms := list -}}
{{- range $k, $v := (.Values.devicePlugin.nvidiaNodeSelector | default dict) -}}
{{- $terms = append $terms (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join " " $terms -}}
{{- end -}}
