{{/* Names and labels. */}}
{{- define "small4.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
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

{{- define "small4.apiKeysSecret" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.create -}}
{{- printf "%s-api-keys" (include "small4.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Environment of every Ray container. */}}
{{- define "small4.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: HF_HUB_OFFLINE
  value: "1"
{{- if dig "ray" "throughput_optimized" true .Values.stack }}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
{{- end }}
{{- if .Values.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .Values.otel.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .Values.otel.serviceName | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ include "small4.otelAttributes" . | quote }}
{{- end }}
{{- end -}}

{{- define "small4.otelAttributes" -}}
{{- $attrs := list (printf "k8s.namespace.name=%s" .Release.Namespace) (printf "service.instance.id=%s" .Release.Name) -}}
{{- range $k, $v := .Values.otel.resourceAttributes }}{{ $attrs = append $attrs (printf "%s=%s" $k $v) }}{{ end -}}
{{- join "," $attrs -}}
{{- end -}}

{{/*
The one pod spec of head and worker groups. Call with a dict:
  root: the chart context; role: "head" | "worker"; resources; gpus (per pod, 0 for none);
  nodeSelector; tolerations; shmSize.
*/}}
{{- define "small4.podSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
serviceAccountName: {{ include "small4.serviceAccountName" $root }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
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
    resources:
      requests:
        {{- toYaml .resources.requests | nindent 8 }}
        {{- if gt (int .gpus) 0 }}
        {{ $v.gpu.resourceName }}: {{ .gpus }}
        {{- end }}
      limits:
        {{- toYaml .resources.limits | nindent 8 }}
        {{- if gt (int .gpus) 0 }}
        {{ $v.gpu.resourceName }}: {{ .gpus }}
        {{- end }}
    ports:
      {{- if eq .role "head" }}
      - {containerPort: 6379, name: gcs}
      - {containerPort: {{ $v.service.port }}, name: serve}
      {{- end }}
      - {containerPort: {{ $v.metricsPort }}, name: metrics}
    volumeMounts:
      - {name: shm, mountPath: /dev/shm}
      {{- if include "small4.apiKeysSecret" $root }}
      - {name: api-keys, mountPath: {{ $v.apiKeys.mountPath }}, readOnly: true}
      {{- end }}
      {{- if and (eq .role "worker") $v.workers.modelVolume.enabled }}
      - {name: models, mountPath: {{ $v.workers.modelVolume.mountPath }}, readOnly: true}
      {{- end }}
volumes:
  - name: shm
    emptyDir: {medium: Memory, sizeLimit: {{ .shmSize }}}
  {{- with include "small4.apiKeysSecret" $root }}
  - name: api-keys
    secret: {secretName: {{ . }}}
  {{- end }}
  {{- if and (eq .role "worker") $v.workers.modelVolume.enabled }}
  - name: models
    persistentVolumeClaim: {claimName: {{ $v.workers.modelVolume.persistentVolumeClaim }}, readOnly: true}
  {{- end }}
{{- end -}}
