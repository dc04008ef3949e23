{{/* The name of every object: the release name, with the chart's name appended unless the
release name already contains it (DNS labels stop at 63 characters). */}}
{{- define "outpost-agent.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "outpost-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "outpost-agent.labels" -}}
{{ include "outpost-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Where the chart mounts what agent.yaml points at. */}}
{{- define "outpost-agent.configDir" -}}/etc/outpost{{- end -}}
{{- define "outpost-agent.stateDir" -}}/var/lib/outpost{{- end -}}
{{- define "outpost-agent.socket" -}}/run/outpost/agent.sock{{- end -}}
{{- define "outpost-agent.credentialsDir" -}}/var/run/secrets/outpost/registry{{- end -}}

{{/* The vendor's root.json, required and checked to be JSON (the agent would only say so at
start, in a crash loop). In lint mode `required` gives "", which is not checked. */}}
{{- define "outpost-agent.rootJson" -}}
{{- $root := required "rootJson is required: the vendor's root.json, e.g. --set-file rootJson=root.json" (.Values.rootJson | default "" | trim) -}}
{{- if and $root (hasKey (fromJson $root) "Error") -}}
{{- fail (printf "rootJson is not valid JSON: %s" (get (fromJson $root) "Error")) -}}
{{- end -}}
{{- $root -}}
{{- end -}}

{{/* agent.yaml: the values' config with the keys that follow from this installation set. */}}
{{- define "outpost-agent.config" -}}
{{- $config := deepCopy (.Values.config | default dict) -}}
{{- $_ := required "config.source is required: where bundles come from (oci, git or dir)" $config.source -}}
{{- $_ := required "config.expect is required: the stack name (and channel) this agent accepts" $config.expect -}}
{{- with .Values.sourceCredentialsSecret -}}
{{- if not (and $config.source (kindIs "map" $config.source) (hasKey $config.source "oci")) -}}
{{- fail "sourceCredentialsSecret needs an OCI source (config.source.oci)" -}}
{{- end -}}
{{- $_ := set $config.source.oci "credentials_file" (printf "%s/config.json" (include "outpost-agent.credentialsDir" $)) -}}
{{- end -}}
{{- range $profile, $grant := ($config.permissions | default dict) -}}
{{- if and (kindIs "map" $grant) (eq (toString (get $grant "service_account")) (include "outpost-agent.fullname" $)) -}}
{{- fail (printf "config.permissions.%s.service_account is the agent's own ServiceAccount: the vendor's pods would get the agent's Role" $profile) -}}
{{- end -}}
{{- end -}}
{{- $api := dict "socket" (include "outpost-agent.socket" .) -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $api "metrics_address" (printf "0.0.0.0:%d" (int .Values.metrics.port)) -}}
{{- end -}}
{{- $kubernetes := deepCopy ($config.kubernetes | default dict) -}}
{{- $_ := set $kubernetes "namespace" .Release.Namespace -}}
{{- $_ := set $config "kubernetes" $kubernetes -}}
{{- $_ := set $config "api" $api -}}
{{- $_ := set $config "runtime" "kubernetes" -}}
{{- $_ := set $config "state_dir" (include "outpost-agent.stateDir" .) -}}
{{- $_ := set $config "trust" (dict "root" (printf "%s/root.json" (include "outpost-agent.configDir" .))) -}}
{{- toYaml $config -}}
{{- end -}}
