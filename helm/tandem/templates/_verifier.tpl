{{/*
The verifier pod spec, shared by the LeaderWorkerSet (leader and worker templates) and the
StatefulSet-per-group fallback. Call with (dict "ctx" $ "rank" RANK "peers" PEERS "group" GROUP
"groupIndexEnv" ENV) where RANK, PEERS and GROUP are strings that may hold $(VAR) references,
which Kubernetes expands from the container's environment, and ENV is the env entry that sets
TANDEM_GROUP_INDEX.
*/}}
{{- define "tandem.verifierPodSpec" -}}
{{- $ := .ctx -}}
{{- $v := $.Values.verifier -}}
{{- $fn := include "tandem.fullname" $ -}}
serviceAccountName: {{ include "tandem.serviceAccountName" $ }}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $.Values.podSecurityContext | nindent 2 }}
# The leader drains for drainGrace, then ends the group; followers exit after it.
terminationGracePeriodSeconds: {{ add (include "tandem.seconds" $v.drainGrace) 15 }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (include "tandem.fetchInitContainer" (dict "ctx" $ "which" $.Values.model.target.fetch) | trim) }}
initContainers:
  {{- . | nindent 2 }}
{{- end }}
containers:
  - name: worker
    image: {{ include "tandem.image" $ }}
    imagePullPolicy: {{ $.Values.image.pullPolicy }}
    # Waits until every rank's name resolves (pods of a group start at different times; the
    # headless service publishes not-ready pods), then runs `tandem worker` with the args below.
    command:
      - /bin/sh
      - -c
      - |
        set -eu
        peers=""
        for a in "$@"; do case "$a" in --group-peers=*) peers="${a#--group-peers=}" ;; esac; done
        IFS=,
        for p in $peers; do
          h="${p%:*}"; n=0
          until getent hosts "$h" >/dev/null; do
            n=`expr $n + 1`
            if [ "$n" -gt 1800 ]; then echo "group peer $h did not resolve in 30 min" >&2; exit 1; fi
            sleep 1
          done
        done
        unset IFS
        exec /usr/local/bin/tandem worker "$@"
      - tandem-worker
    args:
      - --model={{ $.Values.model.mountPath }}/{{ $.Values.model.target.file }}
      - --model-name={{ $.Values.model.target.name }}
      - --quant={{ $v.quant }}
      {{- if gt (int $v.gpus) 0 }}
      {{- /* The pod sees only its own GPUs: rank r uses the first (NCCL carries activations). */}}
      - --device=cuda:0
      {{- end }}
      {{- if gt (int $v.maxContext) 0 }}
      - --max-context={{ $v.maxContext }}
      {{- end }}
      - --listen=0.0.0.0:{{ $v.ports.grpc }}
      - --metrics-listen=0.0.0.0:{{ $v.ports.metrics }}
      - --drain-grace={{ $v.drainGrace }}
      - --rank={{ .rank }}
      - --world-size={{ $v.tensorParallelSize }}
      {{- if gt (int $v.tensorParallelSize) 1 }}
      - --group-peers={{ .peers }}
      - --group-connect-timeout={{ $v.groupConnectTimeout }}
      {{- end }}
      {{- if eq $.Values.discovery.mode "etcd" }}
      # Registration in etcd: this group's name and the address routers call.
      - --group={{ .group }}
      - --advertise-address=$(POD_IP):{{ $v.ports.grpc }}
      {{- include "tandem.discoveryArgs" $ | nindent 6 }}
      {{- end }}
      {{- if $.Values.draft.enabled }}
      - --draft-endpoint={{ include "tandem.draftEndpoint" $ }}
      {{- end }}
      {{- /* The shard API takes only callers with the cluster's certificate (routers). */}}
      {{- include "tandem.tlsServerArgs" (dict "ctx" $ "clientAuth" true) | nindent 6 }}
      {{- include "tandem.tlsClientArgs" $ | nindent 6 }}
      {{- with $v.extraArgs }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    env:
      {{- include "tandem.podEnv" $ | nindent 6 }}
      {{- .groupIndexEnv | nindent 6 }}
      {{- with $v.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    ports:
      - name: grpc
        containerPort: {{ $v.ports.grpc }}
        protocol: TCP
      - name: collective
        containerPort: {{ $v.ports.collective }}
        protocol: TCP
      - name: metrics
        containerPort: {{ $v.ports.metrics }}
        protocol: TCP
    # grpc.health.v1 on the gRPC port: NOT_SERVING until this rank's shard is loaded and the
    # group has met; a leader whose group failed stays NOT_SERVING, so liveness restarts it.
    startupProbe:
      {{- include "tandem.probe" (dict "ctx" $ "grpcPort" $v.ports.grpc "metricsPort" "metrics") | nindent 6 }}
      periodSeconds: {{ $v.startupProbe.periodSeconds }}
      failureThreshold: {{ $v.startupProbe.failureThreshold }}
    readinessProbe:
      {{- include "tandem.probe" (dict "ctx" $ "grpcPort" $v.ports.grpc "metricsPort" "metrics") | nindent 6 }}
      periodSeconds: 5
      failureThreshold: 2
    livenessProbe:
      {{- include "tandem.probe" (dict "ctx" $ "grpcPort" $v.ports.grpc "metricsPort" "metrics") | nindent 6 }}
      periodSeconds: 10
      failureThreshold: 6
    resources:
      {{- include "tandem.resources" (dict "resources" $v.resources "gpus" $v.gpus) | nindent 6 }}
    securityContext:
      {{- toYaml $.Values.securityContext | nindent 6 }}
    volumeMounts:
      {{- include "tandem.modelMounts" $ | nindent 6 }}
      {{- include "tandem.tlsMount" $ | nindent 6 }}
      {{- if $v.shmSizeLimit }}
      - name: dshm
        mountPath: /dev/shm
      {{- end }}
volumes:
  {{- include "tandem.modelVolume" $ | nindent 2 }}
  {{- include "tandem.tlsVolume" $ | nindent 2 }}
  {{- if $v.shmSizeLimit }}
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $v.shmSizeLimit }}
  {{- end }}
{{- end -}}

{{/* A duration such as 30s, 2m or 1h as whole seconds (for terminationGracePeriodSeconds). */}}
{{- define "tandem.seconds" -}}
{{- $d := toString . -}}
{{- if hasSuffix "ms" $d -}}1
{{- else if hasSuffix "s" $d -}}{{ trimSuffix "s" $d | int }}
{{- else if hasSuffix "m" $d -}}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else if hasSuffix "h" $d -}}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- else -}}{{ int $d }}
{{- end -}}
{{- end -}}
