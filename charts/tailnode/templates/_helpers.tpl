{{/* The chart name, overridable. */}}
{{- define "tailnode.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: <release>-tailnode, or <release> when it already says tailnode. */}}
{{- define "tailnode.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tailnode.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tailnode.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tailnode.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tailnode.labels" -}}
helm.sh/chart: {{ include "tailnode.chart" . }}
{{ include "tailnode.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tailnode
{{- end }}

{{- define "tailnode.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tailnode.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* MutatingWebhookConfiguration name = the operator's --webhook-config. */}}
{{- define "tailnode.webhookConfigName" -}}
{{- default (include "tailnode.fullname" .) .Values.webhook.configName }}
{{- end }}

{{/* Service in front of the webhook (a DNS-1035 label: at most 63 characters). */}}
{{- define "tailnode.webhookServiceName" -}}
{{- printf "%s-webhook" (include "tailnode.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/* Secret with the webhook's serving certificate (self-managed or cert-manager's). */}}
{{- define "tailnode.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "tailnode.fullname" .) }}
{{- end }}

{{- define "tailnode.metricsServiceName" -}}
{{- printf "%s-metrics" (include "tailnode.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{- define "tailnode.leaseName" -}}
{{- default (printf "%s-controller" (include "tailnode.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "tailnode.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tailnode.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository .Values.sidecar.image.tag }}
{{- end }}

{{/* The cert-manager Certificate that serves the webhook. */}}
{{- define "tailnode.certificateName" -}}
{{- printf "%s-webhook" (include "tailnode.fullname" .) }}
{{- end }}
