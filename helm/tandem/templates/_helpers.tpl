{{/* Names: fullname is cut to 40 characters so that "<fullname>-verifier-<g>-<i>" and the
     StatefulSet pods' controller-revision labels stay within Kubernetes' 63-character limits. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tandem.cluster" -}}
{{- default .Release.Name .Values.clusterName -}}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{/* selectorLabels: call with (dict "ctx" $ "component" "router") */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The verifier workload: "leaderworkerset" or "statefulset". */}}
{{- define "tandem.verifierWorkload" -}}
{{- if eq .Values.verifier.workload "auto" -}}
{{- if .Capabilities.APIVersions.Has "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet" -}}
leaderworkerset
{{- else -}}
statefulset
{{- end -}}
{{- else -}}
{{- .Values.verifier.workload -}}
{{- end -}}
{{- end -}}

{{/* etcd client endpoints, comma separated; empty in static discovery. */}}
{{- define "tandem.etcdEndpoints" -}}
{{- if eq .Values.discovery.mode "etcd" -}}
{{- if .Values.etcd.enabled -}}
{{- $fn := include "tandem.fullname" . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s-etcd-%d.%s-etcd-peer.%s.svc:2379" $fn $i $fn $.Release.Namespace) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Discovery flags shared by every server (etcd mode only). */}}
{{- define "tandem.discoveryArgs" -}}
{{- if eq .Values.discovery.mode "etcd" }}
- --etcd-endpoints={{ include "tandem.etcdEndpoints" . }}
- --cluster={{ include "tandem.cluster" . }}
{{- end }}
{{- end -}}

{{- define "tandem.draftEndpoint" -}}
{{- printf "http://%s-draft.%s.svc:%d" (include "tandem.fullname" .) .Release.Namespace (int .Values.draft.port) -}}
{{- end -}}

{{/* The leader (rank 0) shard API of group g, for static discovery: (dict "ctx" $ "g" 0). */}}
{{- define "tandem.leaderAddress" -}}
{{- $fn := include "tandem.fullname" .ctx -}}
{{- if eq (include "tandem.verifierWorkload" .ctx) "leaderworkerset" -}}
{{- printf "http://%s-verifier-%d.%s-verifier.%s.svc:%d" $fn (int .g) $fn .ctx.Release.Namespace (int .ctx.Values.verifier.ports.grpc) -}}
{{- else -}}
{{- printf "http://%s-verifier-%d-0.%s-verifier.%s.svc:%d" $fn (int .g) $fn .ctx.Release.Namespace (int .ctx.Values.verifier.ports.grpc) -}}
{{- end -}}
{{- end -}}

{{/* Model volume (the weights), by model.source. */}}
{{- define "tandem.modelVolume" -}}
- name: models
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.fetcher.sizeLimit }}
{{- end }}
{{- if eq .Values.model.source "fetch" }}
- name: fetch-script
  configMap:
    name: {{ include "tandem.fullname" . }}-fetch-models
    defaultMode: 0555
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* Mounts of the model volume (read-only) and TLS in a Tandem container. */}}
{{- define "tandem.modelMounts" -}}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The init container that fetches weights (model.source fetch): (dict "ctx" $ "which" "qwen-1.5b"). */}}
{{- define "tandem.fetchInitContainer" -}}
{{- $v := .ctx.Values -}}
{{- if eq $v.model.source "fetch" }}
- name: fetch-model
  image: {{ printf "%s:%s" $v.model.fetcher.image.repository $v.model.fetcher.image.tag }}
  imagePullPolicy: {{ $v.model.fetcher.image.pullPolicy }}
  command: ["bash", "/opt/tandem/fetch-models", {{ .which | quote }}]
  env:
    - name: TANDEM_MODEL_CACHE
      value: {{ $v.model.mountPath }}
    - name: HOME
      value: /tmp
    - name: PIP_DISABLE_PIP_VERSION_CHECK
      value: "1"
    - name: PIP_NO_CACHE_DIR
      value: "1"
    {{- with $v.model.fetcher.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  resources:
    {{- toYaml $v.model.fetcher.resources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: {{ $v.model.mountPath }}
    - name: fetch-script
      mountPath: /opt/tandem
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{/* Resources with GPUs added: (dict "resources" .Values.verifier.resources "gpus" .Values.verifier.gpus). */}}
{{- define "tandem.resources" -}}
{{- $r := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $lim := deepCopy (default dict (get $r "limits")) -}}
{{- $req := deepCopy (default dict (get $r "requests")) -}}
{{- $_ := set $lim "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $req "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "limits" $lim -}}
{{- $_ := set $r "requests" $req -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* Common env of Tandem containers. */}}
{{- define "tandem.podEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: TANDEM_LOG_JSON
  value: {{ .Values.logJson | quote }}
{{- end -}}

{{/*
TLS flags of a server (router public API, shard API, draft API): its certificate and key from
the mounted secret, and with clientAuth the CA that client certificates must chain to (mTLS).
*/}}
{{- define "tandem.tlsServerArgs" -}}
{{- $t := .ctx.Values.tls -}}
{{- if $t.enabled }}
- --tls-cert={{ $t.mountPath }}/tls.crt
- --tls-key={{ $t.mountPath }}/tls.key
{{- if .clientAuth }}
- --tls-client-ca={{ $t.mountPath }}/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/*
TLS flags of a client hop (router -> shard API, verifier -> draft API): trust ca.crt, expect the
certificate to carry tls.serverName (pods are dialled by IP), present tls.crt (the servers
require it).
*/}}
{{- define "tandem.tlsClientArgs" -}}
{{- $t := .Values.tls -}}
{{- if $t.enabled }}
- --tls-ca={{ $t.mountPath }}/ca.crt
- --tls-server-name={{ $t.serverName }}
{{- end }}
{{- end }}

{{/*
A probe: grpc.health.v1 on the gRPC port, or with TLS (kubelet's gRPC probe has no TLS) the same
health as HTTP on the plaintext metrics port (/readyz: 200 while SERVING).
*/}}
{{- define "tandem.probe" -}}
{{- if .ctx.Values.tls.enabled }}
httpGet:
  path: /readyz
  port: {{ .metricsPort }}
{{- else }}
grpc:
  port: {{ .grpcPort }}
{{- end }}
{{- end }}

{{- define "tandem.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "tandem.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}
