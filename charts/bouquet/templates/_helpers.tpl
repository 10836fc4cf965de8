{{- define "bouquet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "bouquet.labels" -}}
app.kubernetes.io/name: bouquet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "bouquet.selector" -}}
app.kubernetes.io/name: bouquet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "bouquet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "bouquet.workloadsImage" -}}
{{- default (printf "bouquet-workloads:%s" .Chart.AppVersion) .Values.workloadsImage -}}
{{- end -}}

{{/* What the operator does, as RBAC rules: one list for the ClusterRole and each Role. */}}
{{- define "bouquet.rules" -}}
- apiGroups: [bouquet.dev]
  resources: [federatedjobs]
  verbs: [get, list, watch, delete]
- apiGroups: [bouquet.dev]
  resources: [federatedjobs/status]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# The copies of each job's keys that its pods mount: made and deleted, never read, patched
# or listed (the keys themselves are in the operator's own namespace; see keep.py).
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, delete]
- apiGroups: [""]
  resources: [configmaps, services, serviceaccounts, persistentvolumeclaims]
  verbs: [get, create, patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
# Events: its own; and the Job controller's FailedCreate, why a site Job has no pod.
- apiGroups: [""]
  resources: [events]
  verbs: [create, list]
{{- end -}}

{{/* The NetworkPolicy peers that may scrape job servers' metrics: the release's namespace and metrics.scrapers. */}}
{{- define "bouquet.scrapers" -}}
{{- $own := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) -}}
{{- prepend .Values.metrics.scrapers $own | toJson -}}
{{- end -}}
