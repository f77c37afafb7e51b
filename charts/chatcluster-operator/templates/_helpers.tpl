{{/*
Chart name, truncated to 63 characters (a label value's limit).
*/}}
{{- define "chatcluster-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: <release>-<chart>, or just the release name when it already
contains the chart name.
*/}}
{{- define "chatcluster-operator.fullname" -}}
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

{{- define "chatcluster-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object.
*/}}
{{- define "chatcluster-operator.labels" -}}
helm.sh/chart: {{ include "chatcluster-operator.chart" . }}
{{ include "chatcluster-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatcluster
{{- end }}

{{/*
Labels that select the operator pods (immutable in a Deployment's selector).
*/}}
{{- define "chatcluster-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chatcluster-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of the ChatCluster this chart may create: not the operator's selector labels, so nothing
that selects operator pods ever matches chat pods.
*/}}
{{- define "chatcluster-operator.chatClusterLabels" -}}
helm.sh/chart: {{ include "chatcluster-operator.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chatcluster
{{- end }}

{{- define "chatcluster-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chatcluster-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image: repository@digest, or repository:tag (tag defaults to the appVersion).
*/}}
{{- define "chatcluster-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Stops rendering on combinations of values the schema cannot express.
*/}}
{{- define "chatcluster-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without a Lease every replica would reconcile" }}
{{- end }}
{{- /* The release namespace is only empty in `helm lint`. */}}
{{- if and .Values.chatCluster.enabled .Values.watchNamespace .Release.Namespace (ne .Values.watchNamespace .Release.Namespace) }}
{{- fail (printf "chatCluster.enabled creates the ChatCluster in the release namespace %q, which watchNamespace=%q leaves unwatched" .Release.Namespace .Values.watchNamespace) }}
{{- end }}
{{- end }}
