{{/*
Names and labels (the helm create conventions), the RayCluster's pod templates, and tandem.yaml.
*/}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource-name prefix, and the RayCluster's name. KubeRay derives pod and Service names from
the cluster name (NAME-head-svc, NAME-GROUP-worker-xxxxx), so it is kept to 40 characters.
*/}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{/*
KubeRay labels every pod of a RayCluster ray.io/cluster=NAME and ray.io/node-type=head|worker;
these select the head pod (the gateway Service, its PodDisruptionBudget) and the workers.
*/}}
{{- define "tandem.headPodSelector" -}}
ray.io/cluster: {{ include "tandem.fullname" . }}
ray.io/node-type: head
{{- end }}

{{- define "tandem.workerPodSelector" -}}
ray.io/cluster: {{ include "tandem.fullname" . }}
ray.io/node-type: worker
{{- end }}

{{/*
An image reference: the component's override (a map, possibly empty) over .Values.image.
Usage: include "tandem.image" (dict "root" . "override" .Values.head.image)
*/}}
{{- define "tandem.image" -}}
{{- $image := merge (deepCopy (.override | default dict)) .root.Values.image -}}
{{- printf "%s:%s" $image.repository (toString (default .root.Chart.AppVersion $image.tag)) -}}
{{- end }}

{{- define "tandem.imagePullPolicy" -}}
{{- (.override | default dict).pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end }}

{{/*
HTTP or HTTPS: the gateway serves TLS on both ports when tandem.yaml has tls_cert.
*/}}
{{- define "tandem.scheme" -}}
{{- if .Values.config.extraConfig.tls_cert }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
The gateway's GET /health, the probe of the tandem container.
*/}}
{{- define "tandem.healthGet" -}}
httpGet:
  path: /health
  port: http
  scheme: {{ include "tandem.scheme" . }}
{{- end }}

{{- define "tandem.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-apikeys" (include "tandem.fullname" .)) -}}
{{- end }}

{{/*
The keys of tandem.yaml the chart owns: they must agree with the pods and the Service.
*/}}
{{- define "tandem.ownedConfigKeys" -}}
model host service_host grpc_port http_port gateway_resources dashboard ray_address internal_token drain_grace_s
{{- end }}

{{/*
The head pod's grace: the preStop sleep, tandem's drain, then stopping the rest of the pipeline.
*/}}
{{- define "tandem.terminationGracePeriodSeconds" -}}
{{- add .Values.gateway.preStopSleepSeconds .Values.gateway.drainGraceSeconds .Values.gateway.stopMarginSeconds }}
{{- end }}

{{/*
tandem.yaml: .Values.config, then config.extraConfig key by key (a key replaces the key of the
same name: a shallow merge, so `rag_hybrid: false` or `speculative: null` there does override),
then the keys the chart owns. Nulls are left out: tandem's default applies.
*/}}
{{- define "tandem.config" -}}
{{- $owned := splitList " " (include "tandem.ownedConfigKeys" .) }}
{{- range $key, $_ := .Values.config.extraConfig }}
{{- if has $key $owned }}
{{- fail (printf "config.extraConfig.%s: the chart sets %s itself (see values.yaml)" $key $key) }}
{{- end }}
{{- end }}
{{- $config := dict }}
{{- range $key, $value := omit .Values.config "extraConfig" }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- range $key, $value := .Values.config.extraConfig }}
{{- $_ := set $config $key $value }}
{{- end }}
{{- $_ := set $config "model" .Values.model.name }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ := set $config "service_host" "0.0.0.0" }}
{{- $_ := set $config "grpc_port" (int .Values.gateway.grpcPort) }}
{{- $_ := set $config "http_port" (int .Values.gateway.httpPort) }}
{{- $_ := set $config "gateway_resources" (dict "tandem_gateway" 1) }}
{{- $_ := set $config "dashboard" .Values.rayCluster.dashboard }}
{{- $_ := set $config "drain_grace_s" (int .Values.gateway.drainGraceSeconds) }}
{{- $tp := int (default 1 $config.tensor_parallel_size) }}
{{- $ep := int (default 1 $config.expert_parallel_size) }}
{{- $pp := int (default 1 $config.pipeline_parallel_size) }}
{{- $ranks := mul (max $tp $ep) $pp }}
{{- if and (gt $ranks 1) (eq (toString (default "auto" $config.mode)) "disaggregated") }}
{{- fail (printf "config: a worker split over %d ranks (tensor/pipeline/expert_parallel_size) runs aggregated: set config.mode to aggregated or auto" $ranks) }}
{{- end }}
{{- range $key, $value := $config }}
{{- if kindIs "invalid" $value }}
{{- $_ := unset $config $key }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
Volumes and mounts every Ray container has: the memory-backed /dev/shm (Ray's object store), and
the model volume when there is one.
*/}}
{{- define "tandem.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.rayCluster.shmSize }}
{{- if .Values.model.volume.enabled }}
- name: models
  {{- toYaml .Values.model.volume.source | nindent 2 }}
{{- end }}
{{- end }}

{{- define "tandem.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.model.volume.enabled }}
- name: models
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: {{ .Values.model.volume.readOnly }}
{{- end }}
{{- end }}

{{/*
A worker group of the RayCluster. Usage: include "tandem.workerGroup" (dict "root" . "group" .Values.workers.cpu)
*/}}
{{- define "tandem.workerGroup" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- if or (lt (int $group.replicas) (int $group.minReplicas)) (gt (int $group.replicas) (int $group.maxReplicas)) }}
{{- fail (printf "workers (group %s): need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" $group.groupName $group.minReplicas $group.replicas $group.maxReplicas) }}
{{- end -}}
- groupName: {{ $group.groupName }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    {{- range $key, $value := $group.rayStartParams }}
    {{ $key }}: {{ toString $value | quote }}
    {{- else }} {}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "tandem.labels" $root | nindent 8 }}
        app.kubernetes.io/component: worker-{{ $group.groupName }}
        {{- with $group.labels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $group.annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        # KubeRay runs `ray start --address=HEAD` in the first container; prefill and decode actors
        # run in the processes it starts.
        - name: ray-worker
          image: {{ include "tandem.image" (dict "root" $root "override" $group.image) }}
          imagePullPolicy: {{ include "tandem.imagePullPolicy" (dict "root" $root "override" $group.image) }}
          env:
            {{- include "tandem.internalTokenEnv" $root | nindent 12 }}
            {{- include "tandem.rayEnv" $root | nindent 12 }}
            {{- with $group.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- toYaml $group.resources | nindent 12 }}
          volumeMounts:
            {{- include "tandem.rayVolumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "tandem.rayVolumes" $root | nindent 8 }}
      {{- with $group.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $group.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
TANDEM_API_KEYS (comma-separated keys, read by the gateway actor) from the Secret. Both head
containers get it: the gateway runs in a process of ray-head; `tandem serve` reports it.
*/}}
{{- define "tandem.internalTokenSecretName" -}}
{{- .Values.internalToken.existingSecret | default (printf "%s-internal-token" (include "tandem.fullname" .)) -}}
{{- end }}

{{/*
TANDEM_INTERNAL_TOKEN: the pipeline token every internal service requires (docs/security.md).
Every Ray container gets it: the driver hands it to the actors, and a tool run in any pod
(`tandem service`, a debugging client) finds it there.
*/}}
{{- define "tandem.internalTokenEnv" -}}
- name: TANDEM_INTERNAL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.internalTokenSecretName" . }}
      key: {{ .Values.internalToken.secretKey }}
{{- end }}

{{/* Ray's workers (every tandem service) at nice 0, not Ray's default 15: the engine must not
yield to every other process at each token (bench/RESULTS.md, the pipeline against the engine). */}}
{{- define "tandem.rayEnv" -}}
- name: RAY_worker_niceness
  value: "0"
{{- end }}

{{- define "tandem.apiKeysEnv" -}}
{{- if .Values.apiKeys.enabled }}
- name: TANDEM_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.apiKeysSecretName" . }}
      key: {{ .Values.apiKeys.secretKey }}
{{- end }}
{{- end }}
