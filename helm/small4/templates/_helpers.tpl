{{/* Names and labels. KubeRay refuses a RayService name over 47 characters. */}}
{{- define "small4.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "small4.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "small4.labels" -}}
{{ include "small4.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "small4.serviceAccountName" -}}
{{- default (include "small4.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Secret holding API keys, or nothing: the chart never invents a key. */}}
{{- define "small4.apiKeysSecret" -}}
{{- if and .Values.apiKeys.existingSecret .Values.apiKeys.create -}}
{{- fail "set either apiKeys.existingSecret or apiKeys.create, not both" -}}
{{- else if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.create -}}
{{- printf "%s-api-keys" (include "small4.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The latency histograms' bucket bounds (services/telemetry/metrics.py LATENCY_BUCKETS;
a test keeps the two equal). */}}
{{- define "small4.latencyBuckets" -}}
0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2,2.5,4,5,10,30,60,120
{{- end -}}

{{/* Ray's Prometheus port on every pod: the stack's own `ray.metrics_port`. */}}
{{- define "small4.metricsPort" -}}
{{- $port := dig "ray" "metrics_port" 8080 .Values.stack | int -}}
{{- include "small4.notRayPort" (list "stack.ray.metrics_port" $port) -}}
{{- $port -}}
{{- end -}}

{{/* Ray's own ports (cluster/topology.py RAY_PORTS, which the stack refuses too, but only once
its app builds in the cluster): http.port 8265 had the NetworkPolicy open the Ray dashboard,
which takes jobs, to every client. */}}
{{- define "small4.notRayPort" -}}
{{- $field := index . 0 -}}
{{- $port := index . 1 | int -}}
{{- $ray := dict "6379" "the Ray GCS" "8265" "the Ray dashboard" "10001" "the Ray client server" "52365" "the Ray dashboard agent" -}}
{{- if hasKey $ray (toString $port) -}}
{{- fail (printf "%s: %d is the port of %s on every node; give another" $field $port (get $ray (toString $port))) -}}
{{- end -}}
{{- end -}}

{{/* The Secret mounted for the API keys: only where the stack checks keys, and where its
`auth.keys_file` lies under the mount. */}}
{{- define "small4.mountedKeys" -}}
{{- if dig "auth" "enabled" true .Values.stack -}}
{{- $secret := include "small4.apiKeysSecret" . -}}
{{- if not $secret -}}
{{- fail "stack.auth.enabled needs the API keys: set apiKeys.existingSecret or apiKeys.create" -}}
{{- end -}}
{{- $file := dig "auth" "keys_file" "" .Values.stack | toString -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.apiKeys.mountPath)) $file) -}}
{{- fail (printf "stack.auth.keys_file %q is not under apiKeys.mountPath %q, where the Secret is mounted" $file .Values.apiKeys.mountPath) -}}
{{- end -}}
{{- $secret -}}
{{- end -}}
{{- end -}}

{{/* A checkpoint model, and a speculative draft model, lie on the workers' model volume: one
elsewhere (or no volume) renders, then every engine fails to load it once its GPUs are held. */}}
{{- define "small4.checkedModel" -}}
{{- $spec := dig "engine" "speculative" (dict) .Values.stack | default dict -}}
{{- $draft := get $spec "draft_model_path" | default "" | toString -}}
{{- if $draft -}}
{{- $volume := .Values.workers.modelVolume -}}
{{- $mount := trimSuffix "/" $volume.mountPath -}}
{{- if not (and $volume.enabled (hasPrefix (printf "%s/" $mount) $draft)) -}}
{{- fail (printf "stack.engine.speculative.draft_model_path %q is not under workers.modelVolume.mountPath %q (enabled: %v), where the weights are mounted" $draft $volume.mountPath $volume.enabled) -}}
{{- end -}}
{{- end -}}
{{- if eq (dig "model" "source" "standin" .Values.stack | toString) "checkpoint" -}}
{{- $path := dig "model" "path" "" .Values.stack | toString -}}
{{- $volume := .Values.workers.modelVolume -}}
{{- if not $volume.enabled -}}
{{- fail (printf "stack.model.source is checkpoint (%s) but workers.modelVolume.enabled is false: the engines would find no weights" $path) -}}
{{- end -}}
{{- $mount := trimSuffix "/" $volume.mountPath -}}
{{- if not (or (eq (trimSuffix "/" $path) $mount) (hasPrefix (printf "%s/" $mount) $path)) -}}
{{- fail (printf "stack.model.path %q is not under workers.modelVolume.mountPath %q, where the weights are mounted" $path $volume.mountPath) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The port Serve's HTTP proxy listens on: the stack's own `http.port`. */}}
{{- define "small4.httpPort" -}}
{{- $port := dig "http" "port" 8000 .Values.stack | int -}}
{{- include "small4.notRayPort" (list "stack.http.port" $port) -}}
{{- $port -}}
{{- end -}}

{{/* How long a Ray node drains on SIGTERM (a node drain, a cluster upgrade) before Ray stops its
processes: as `small4 up` drains (StackSettings.drain_s), the stack's `ray.drain_timeout_s` and
at least its longest `drain_deadline_s` (each Serve deployment's graceful_shutdown_timeout_s,
cluster/topology.py) over the pools' prefill and decode roles, the ingress and multimodal, in
whole seconds rounded up, plus 15 s for Serve's controller to see the node draining and stop its
replicas. A value left unset is the settings' default, 60 s (services/settings.py,
DeploymentSettings.drain_deadline_s; cluster/settings.py, RaySettings.drain_timeout_s). */}}
{{- define "small4.drainSeconds" -}}
{{- $stack := .Values.stack | default dict -}}
{{- $deadlines := list (dig "ingress" "drain_deadline_s" 60 $stack)
    (dig "multimodal" "drain_deadline_s" 60 $stack) (dig "ray" "drain_timeout_s" 60 $stack) -}}
{{- range $pool := dig "pools" (dict) $stack | default dict -}}
{{- range $role := list "prefill" "decode" -}}
{{- $deadlines = append $deadlines (dig $role "drain_deadline_s" 60 ($pool | default dict)) -}}
{{- end -}}
{{- end -}}
{{- $longest := 0 -}}
{{- range $deadlines }}{{ $longest = max $longest (ceil .) }}{{ end -}}
{{- add $longest 15 -}}
{{- end -}}

{{/* terminationGracePeriodSeconds of every pod, the head's too (its proxy relays streams, its GCS
and Serve controller run the workers' drain): Ray's drain, then 15 s to stop its processes before
the kubelet kills them (Kubernetes' default, 30 s, cut every longer stream). */}}
{{- define "small4.terminationGrace" -}}
{{- add (include "small4.drainSeconds" . | int) 15 -}}
{{- end -}}

{{/* Environment of every Ray container. */}}
{{- define "small4.env" -}}
{{- $tracing := dig "telemetry" "tracing" "enabled" "unset" .Values.stack | toString -}}
{{- if and .Values.otel.enabled (eq $tracing "false") -}}
{{- fail "otel.enabled sets the OTLP exporter environment, but stack.telemetry.tracing.enabled is false: nothing would be exported (leave it unset: the environment turns tracing on)" -}}
{{- end -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HF_HUB_OFFLINE
  value: "1"
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH  # bounded request heads, JSON edge errors
  value: "services.guard.http_edge:install"
- name: SMALL4_WRITE_STALL_S  # the proxy cuts a response its client stopped reading
  value: {{ dig "limits" "write_stall_s" 30 .Values.stack | toString | quote }}
- name: SMALL4_MAX_BODY_BYTES  # the proxy refuses a larger body before holding it (413)
  value: {{ dig "limits" "max_body_bytes" 117440512 .Values.stack | int64 | toString | quote }}
{{- $budget := dig "limits" "edge_body_budget_bytes" 1073741824 .Values.stack }}
- name: SMALL4_EDGE_BODY_BUDGET_BYTES  # bodies the proxy may hold for requests not answered
  value: {{ $budget | int64 | toString | quote }}
{{- if include "small4.mountedKeys" . }}
- name: SMALL4_KEYS_FILE  # the proxy refuses a request without a valid key before its body
  value: {{ .Values.stack.auth.keys_file | quote }}
- name: SMALL4_KEYS_RELOAD_S
  value: {{ dig "auth" "reload_s" 5 .Values.stack | toString | quote }}
- name: SMALL4_CORS_ORIGINS  # its 401 carries the CORS headers the ingress would add
  value: {{ dig "auth" "cors_origins" list .Values.stack | toJson | quote }}
{{- end }}
- name: RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH  # calls between replicas as large as the
  value: "2147483647"                             # limits allow (cluster.settings)
# on SIGTERM `ray start --block` marks its node draining and waits this long for it to empty
# (Ray's default: 30 s); the pod's grace period (small4.terminationGrace) outlasts it
- name: RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
  value: {{ include "small4.drainSeconds" . | quote }}
{{- if dig "ray" "throughput_optimized" true .Values.stack }}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
# ... without its direct ingress, which moves Serve's only HTTP proxy to the head: every node
# keeps a proxy (KubeRay's readiness probe of a worker pod asks its proxy; clients spread over
# the nodes, not through the head's CPUs)
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: "0"
{{- end }}
{{- if .Values.otel.enabled }}
- name: K8S_POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: K8S_NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ required "otel.endpoint is required when otel.enabled" .Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ include "small4.otelAttributes" . | quote }}
{{- end }}
{{- end -}}

{{/* Resource attributes; Kubernetes expands $(K8S_*) from the variables defined before. */}}
{{- define "small4.otelAttributes" -}}
{{- $attrs := list (printf "k8s.namespace.name=%s" .Release.Namespace) "k8s.pod.name=$(K8S_POD_NAME)" "k8s.node.name=$(K8S_NODE_NAME)" -}}
{{- range $k, $v := .Values.otel.resourceAttributes }}{{ $attrs = append $attrs (printf "%s=%s" $k $v) }}{{ end -}}
{{- join "," $attrs -}}
{{- end -}}

{{/*
The one pod spec of the head and worker groups. Call with a dict:
  root: the chart context; role: "head" | "worker"; group: .Values.head or .Values.workers;
  gpus: GPUs per pod (0 for none).
The Ray container comes first (KubeRay requires it). The head declares KubeRay's well-known port
names: the operator builds the head Service from them and reaches the dashboard by name.
*/}}
{{- define "small4.podSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $group := .group -}}
{{- $apiKeys := include "small4.mountedKeys" $root -}}
{{- $models := and (eq .role "worker") $v.workers.modelVolume.enabled -}}
{{- include "small4.checkedModel" $root -}}
serviceAccountName: {{ include "small4.serviceAccountName" $root }}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ include "small4.terminationGrace" $root }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: ray-{{ .role }}
    image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
    imagePullPolicy: {{ $v.image.pullPolicy }}
    securityContext:
      {{- toYaml $v.containerSecurityContext | nindent 6 }}
    env:
      {{- include "small4.env" $root | nindent 6 }}
    {{- with $v.extraEnvFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    resources:
      requests:
        {{- toYaml $group.resources.requests | nindent 8 }}
        {{- if gt (int .gpus) 0 }}
        {{ $v.gpu.resourceName }}: {{ .gpus }}
        {{- end }}
      limits:
        {{- toYaml $group.resources.limits | nindent 8 }}
        {{- if gt (int .gpus) 0 }}
        {{ $v.gpu.resourceName }}: {{ .gpus }}
        {{- end }}
    ports:
      {{- if eq .role "head" }}
      - {name: gcs-server, containerPort: 6379}
      - {name: dashboard, containerPort: 8265}
      - {name: client, containerPort: 10001}
      {{- end }}
      - {name: serve, containerPort: {{ include "small4.httpPort" $root }}}
      - {name: metrics, containerPort: {{ include "small4.metricsPort" $root }}}
    volumeMounts:
      - {name: shm, mountPath: /dev/shm}
      {{- if $apiKeys }}
      - {name: api-keys, mountPath: {{ $v.apiKeys.mountPath }}, readOnly: true}
      {{- end }}
      {{- if $models }}
      - {name: models, mountPath: {{ $v.workers.modelVolume.mountPath }}, readOnly: true}
      {{- end }}
volumes:
  - name: shm
    emptyDir: {medium: Memory, sizeLimit: {{ $group.shmSize }}}
  {{- if $apiKeys }}
  - name: api-keys
    secret: {secretName: {{ $apiKeys }}}
  {{- end }}
  {{- if $models }}
  - name: models
    persistentVolumeClaim: {claimName: {{ required "workers.modelVolume.persistentVolumeClaim is required when the model volume is enabled" $v.workers.modelVolume.persistentVolumeClaim }}, readOnly: true}
  {{- end }}
{{- end -}}
