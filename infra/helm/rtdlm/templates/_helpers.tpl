{{/* Chart name, for the app.kubernetes.io/name label (Prometheus keeps pods labelled rtdlm). */}}
{{- define "rtdlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource name prefix. Kept to 40 characters: Indexed Job pods are named
JOB-INDEX-RANDOM and their hostnames JOB-INDEX, which must fit DNS's 63. */}}
{{- define "rtdlm.fullname" -}}
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

{{- define "rtdlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every release pod carries: what the default-deny NetworkPolicy selects. */}}
{{- define "rtdlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rtdlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rtdlm.labels" -}}
helm.sh/chart: {{ include "rtdlm.chart" . }}
{{ include "rtdlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rtdlm
{{- end -}}

{{/* The component of the training pods: one pod, or the distributed job's workers. */}}
{{- define "rtdlm.component" -}}
{{- if .Values.distributed_training.enabled -}}worker{{- else -}}trainer{{- end -}}
{{- end -}}

{{/* Labels selecting the training pods of whichever Job renders. */}}
{{- define "rtdlm.podSelectorLabels" -}}
{{ include "rtdlm.selectorLabels" . }}
app.kubernetes.io/component: {{ include "rtdlm.component" . }}
{{- end -}}

{{/* Name of the Job: JOB-0 is pod 0's hostname in the distributed job. */}}
{{- define "rtdlm.jobName" -}}
{{- if .Values.distributed_training.enabled -}}
{{- printf "%s-workers" (include "rtdlm.fullname" .) -}}
{{- else -}}
{{- printf "%s-train" (include "rtdlm.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* The headless Service giving each distributed pod a DNS name. */}}
{{- define "rtdlm.headlessServiceName" -}}
{{- printf "%s-workers" (include "rtdlm.fullname" .) -}}
{{- end -}}

{{- define "rtdlm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rtdlm.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether the pods use GPUs: enabled and at least one. */}}
{{- define "rtdlm.gpu" -}}
{{- if and .Values.training.gpu.enabled (gt (int .Values.training.gpu.count) 0) -}}true{{- end -}}
{{- end -}}

{{/* The trainer image: train-VERSION for GPUs, train-cpu-VERSION without. */}}
{{- define "rtdlm.image" -}}
{{- $version := default .Chart.AppVersion .Values.image.version -}}
{{- $tag := .Values.image.tag -}}
{{- if not $tag -}}
{{- $tag = ternary (printf "train-%s" $version) (printf "train-cpu-%s" $version) (eq (include "rtdlm.gpu" .) "true") -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "rtdlm.checkpointsClaim" -}}
{{- default (printf "%s-checkpoints" (include "rtdlm.fullname" .)) .Values.persistence.checkpoints.existingClaim -}}
{{- end -}}

{{- define "rtdlm.dataClaim" -}}
{{- default (printf "%s-data" (include "rtdlm.fullname" .)) .Values.persistence.data.existingClaim -}}
{{- end -}}

{{- define "rtdlm.secretName" -}}
{{- default (printf "%s-env" (include "rtdlm.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The run dir on object storage or the checkpoint volume: one per release, so a reinstall
resumes it. */}}
{{- define "rtdlm.runDir" -}}
{{- if .Values.objectStorage.url -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.objectStorage.url) .Release.Name -}}
{{- else -}}
{{- printf "/runs/%s" .Release.Name -}}
{{- end -}}
{{- end -}}

{{/* Whether the run dir is on the checkpoint volume's claim. */}}
{{- define "rtdlm.runsClaim" -}}
{{- if and .Values.persistence.checkpoints.enabled (not .Values.objectStorage.url) -}}true{{- end -}}
{{- end -}}

{{/* The trainer's config file: training.config, with the preset, the metrics port and the
data volume filled in (the user's own data.path wins). */}}
{{- define "rtdlm.trainerConfig" -}}
{{- $config := deepCopy .Values.training.config -}}
{{- $_ := set $config "preset" .Values.training.model.preset -}}
{{- $metrics := default dict (get $config "metrics") -}}
{{- $_ = set $metrics "enabled" .Values.metrics.enabled -}}
{{- $_ = set $metrics "port" (int .Values.metrics.port) -}}
{{- $_ = set $config "metrics" $metrics -}}
{{- if .Values.persistence.data.enabled -}}
{{- $data := default dict (get $config "data") -}}
{{- if not (hasKey $data "path") -}}
{{- $_ = set $data "path" (trimSuffix "/" (printf "/data/%s" (trimAll "/" .Values.persistence.data.shardDir))) -}}
{{- end -}}
{{- $_ = set $config "data" $data -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The trainer CLI: what the image's entrypoint receives. */}}
{{- define "rtdlm.trainerArgs" -}}
- --preset
- {{ .Values.training.model.preset | quote }}
- --config
- /etc/rtdlm/config.yaml
- --run-dir
- {{ include "rtdlm.runDir" . | quote }}
{{- if .Values.objectStorage.url }}
- --lease-seconds
- {{ .Values.objectStorage.leaseSeconds | quote }}
{{- end }}
{{- if .Values.metrics.enabled }}
- --metrics-host
- 0.0.0.0
- --metrics-port
- {{ .Values.metrics.port | quote }}
{{- else }}
- --no-metrics
{{- end }}
- {{ ternary "--resume" "--no-resume" .Values.training.resume }}
{{- if not .Values.tracking.tensorboard }}
- --no-tensorboard
{{- end }}
{{- if .Values.distributed_training.enabled }}
- --join-timeout
- {{ .Values.distributed_training.joinTimeoutSeconds | quote }}
- --heartbeat-timeout
- {{ .Values.distributed_training.heartbeatTimeoutSeconds | quote }}
{{- end }}
{{- range .Values.training.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Pod annotations: Prometheus discovery (infra/monitoring/prometheus/prometheus-kubernetes.yml)
and a config checksum, so a changed config is visible on the pod. */}}
{{- define "rtdlm.podAnnotations" -}}
checksum/config: {{ include "rtdlm.trainerConfig" . | sha256sum }}
{{- if and .Values.metrics.enabled .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .Values.training.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The training pod spec, shared by the single-node and the distributed Job. */}}
{{- define "rtdlm.podSpec" -}}
{{- $gpu := eq (include "rtdlm.gpu" .) "true" -}}
{{- $t := .Values.training -}}
serviceAccountName: {{ include "rtdlm.serviceAccountName" . }}
automountServiceAccountToken: false
# Never: a failed pod is replaced by a new one, which the Job's podFailurePolicy can judge.
restartPolicy: Never
enableServiceLinks: false
terminationGracePeriodSeconds: {{ $t.terminationGracePeriodSeconds }}
{{- with $t.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- $nodeSelector := deepCopy $t.nodeSelector -}}
{{- if and $gpu $t.gpu.type -}}
{{- $_ := set $nodeSelector $t.gpu.nodeLabelKey $t.gpu.type -}}
{{- end -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $t.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := $t.tolerations -}}
{{- if $gpu -}}
{{- $tolerations = concat $tolerations $t.gpu.tolerations -}}
{{- end -}}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if and $gpu $t.gpu.initCheck }}
initContainers:
  - name: gpu-check
    image: {{ default (include "rtdlm.image" .) $t.gpu.initCheckImage | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["nvidia-smi"]
    env:
      - name: NVIDIA_DRIVER_CAPABILITIES
        value: compute,utility
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    resources:
      requests:
        cpu: 100m
        memory: 128Mi
        {{ $t.gpu.resourceName }}: {{ $t.gpu.count }}
      limits:
        memory: 128Mi
        {{ $t.gpu.resourceName }}: {{ $t.gpu.count }}
{{- end }}
containers:
  - name: trainer
    image: {{ include "rtdlm.image" . | quote }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args:
      {{- include "rtdlm.trainerArgs" . | nindent 6 }}
    env:
      # The root filesystem is read-only: caches and home go to the /tmp emptyDir.
      - name: HOME
        value: /tmp
      - name: XDG_CACHE_HOME
        value: /tmp/.cache
      {{- if $gpu }}
      - name: NVIDIA_DRIVER_CAPABILITIES
        value: compute,utility
      {{- end }}
      {{- if .Values.distributed_training.enabled }}
      # How this process joins the job (rtdlm.train.distributed reads these).
      - name: RTDLM_COORDINATOR_ADDRESS
        value: {{ printf "%s-0.%s:%d" (include "rtdlm.jobName" .) (include "rtdlm.headlessServiceName" .) (int .Values.distributed_training.coordinatorPort) | quote }}
      - name: RTDLM_NUM_PROCESSES
        value: {{ .Values.distributed_training.workers | quote }}
      - name: RTDLM_PROCESS_ID
        valueFrom:
          fieldRef:
            fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
      {{- end }}
      - name: MLFLOW_EXPERIMENT_NAME
        value: {{ .Values.tracking.mlflow.experiment | quote }}
      {{- with .Values.tracking.mlflow.uri }}
      - name: MLFLOW_TRACKING_URI
        value: {{ . | quote }}
      {{- end }}
      {{- with $t.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if or .Values.secrets.create .Values.secrets.existingSecret }}
    envFrom:
      - secretRef:
          name: {{ include "rtdlm.secretName" . }}
    {{- end }}
    ports:
      {{- if .Values.metrics.enabled }}
      - name: metrics
        containerPort: {{ .Values.metrics.port }}
        protocol: TCP
      {{- end }}
      {{- if .Values.distributed_training.enabled }}
      - name: coordinator
        containerPort: {{ .Values.distributed_training.coordinatorPort }}
        protocol: TCP
      {{- end }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    resources:
      {{- $resources := deepCopy $t.resources -}}
      {{- if $gpu -}}
      {{- $requests := default dict (get $resources "requests") -}}
      {{- $limits := default dict (get $resources "limits") -}}
      {{- $_ := set $requests $t.gpu.resourceName (int $t.gpu.count) -}}
      {{- $_ = set $limits $t.gpu.resourceName (int $t.gpu.count) -}}
      {{- $_ = set $resources "requests" $requests -}}
      {{- $_ = set $resources "limits" $limits -}}
      {{- end }}
      {{- toYaml $resources | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/rtdlm
        readOnly: true
      - name: runs
        mountPath: /runs
      {{- if .Values.persistence.data.enabled }}
      - name: data
        mountPath: /data
        readOnly: true
      {{- end }}
      - name: tmp
        mountPath: /tmp
      - name: shm
        mountPath: /dev/shm
volumes:
  - name: config
    configMap:
      name: {{ include "rtdlm.fullname" . }}-config
  - name: runs
    {{- if include "rtdlm.runsClaim" . }}
    persistentVolumeClaim:
      claimName: {{ include "rtdlm.checkpointsClaim" . }}
    {{- else }}
    emptyDir: {}
    {{- end }}
  {{- if .Values.persistence.data.enabled }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ include "rtdlm.dataClaim" . }}
      readOnly: true
  {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: {{ $t.tmpSize }}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $t.shmSize }}
{{- end -}}

{{/* The Job's failure handling, shared by both Jobs. Exit code 2 is the trainer's "bad input"
(config, data, run dir): a new pod would fail the same way, so the Job fails at once. A pod
evicted, preempted or on a node that shut down (condition DisruptionTarget) is replaced
without counting against backoffLimit. Everything else counts, and the new pod resumes. */}}
{{- define "rtdlm.podFailurePolicy" -}}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: trainer
        operator: In
        values: [2]
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end -}}
