{{- define "pensieve-operator.labels" -}}
app.kubernetes.io/name: pensieve-operator
app.kubernetes.io/part-of: pensieve
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
