{{- define "gate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "gate.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "gate.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "gate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "gate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The workload kind: a StatefulSet only when each pod keeps its outbox on its own PersistentVolumeClaim. */}}
{{- define "gate.kind" -}}
{{- if .Values.usage.outbox.persistence.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* Where the probes and the ServiceMonitor find /actuator/*: the management port when set. */}}
{{- define "gate.healthPort" -}}
{{- if .Values.management.port }}management{{ else }}http{{ end }}
{{- end }}

{{/* TLS covers the main port only; the management port stays plain HTTP inside the pod network. */}}
{{- define "gate.healthScheme" -}}
{{- if and .Values.tls.enabled (not .Values.management.port) }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{- define "gate.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- $minimum := add $s.preStopSeconds $s.drainTimeoutSeconds $s.flushTimeoutSeconds }}
{{- if $s.terminationGracePeriodSeconds }}
{{- if le (int $s.terminationGracePeriodSeconds) (int $minimum) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds (%v) must exceed preStop + drain + flush (%v), or Kubernetes kills Gate before it has flushed its outbox" $s.terminationGracePeriodSeconds $minimum) }}
{{- end }}
{{- $s.terminationGracePeriodSeconds }}
{{- else }}
{{- add $minimum 10 }}
{{- end }}
{{- end }}

{{- define "gate.configChecks" -}}
{{- if not (has .Values.anthropicKeys.mode (list "files" "env")) }}
{{- fail "anthropicKeys.mode must be files or env" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if not (has .Values.tls.clientAuth (list "none" "want" "need")) }}
{{- fail "tls.clientAuth must be none, want or need" }}
{{- end }}
{{- if and (eq .Values.store.backend "postgres") (not .Values.store.postgresUrlSecret.name) }}
{{- fail "store.backend postgres needs store.postgresUrlSecret.name" }}
{{- end }}
{{- if and .Values.tls.enabled (eq .Values.tls.clientAuth "need") (not .Values.management.port) }}
{{- fail "tls.clientAuth need requires management.port: the kubelet's probes carry no client certificate" }}
{{- end }}
{{- end }}
