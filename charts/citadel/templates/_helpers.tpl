{{/* Names, labels and small shared pieces. Every helper starts with "citadel.". */}}

{{- define "citadel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name. The longest suffix of a name that must be a
63-character DNS label, the operator's metrics Service's (-operator-metrics), adds
17 characters, so it is cut at 46; without the operator, at 47 (-gateway-... and
the rest add at most 16), as before that Service existed, so that no name moves.
*/}}
{{- define "citadel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc (ternary 46 47 .Values.operator.enabled) | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc (ternary 46 47 .Values.operator.enabled) | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc (ternary 46 47 .Values.operator.enabled) | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "citadel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "citadel.labels" -}}
{{- /* Here, as every object's labels come before anything it reads from the
values: checked in a file of its own, Helm rendered that file after the
templates in folders, which failed first on the missing keys. */}}
{{- include "citadel.checkValuesLayout" .ctx }}
helm.sh/chart: {{ include "citadel.chart" .ctx }}
{{ include "citadel.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: citadel
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels a component's selectors use; they never change across upgrades. */}}
{{/*
A pod's labels: the selector's, then `labels` (a podLabels value, named `name` in
the error), which may not set a selector key: Helm would render it twice, the last
one would win, and the API server would refuse a Deployment whose template no
longer matches its selector.
*/}}
{{- define "citadel.podLabels" -}}
{{- $selector := include "citadel.selectorLabels" . | fromYaml }}
{{- range $key, $_ := .labels }}
{{- if hasKey $selector $key }}
{{- fail (printf "%s may not set %s: the Deployment's selector uses it" $.name $key) }}
{{- end }}
{{- end }}
{{- include "citadel.selectorLabels" . }}
{{- with .labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "citadel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "citadel.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "citadel.operator.fullname" -}}
{{ include "citadel.fullname" . }}-operator
{{- end }}

{{- define "citadel.gateway.fullname" -}}
{{ include "citadel.fullname" . }}-gateway
{{- end }}

{{- define "citadel.redis.fullname" -}}
{{ include "citadel.fullname" . }}-redis
{{- end }}

{{- define "citadel.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "citadel.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "citadel.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "citadel.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference; call with (dict "image" .Values.x.image "ctx" $). */}}
{{- define "citadel.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* The namespaces holding models: empty means cluster-wide. */}}
{{- define "citadel.watchNamespaces" -}}
{{- join "," (uniq .Values.watchNamespaces) }}
{{- end }}

{{/* Where the gateway's limits live: an external URL, the bundled Redis, or "". */}}
{{- define "citadel.redisUrl" -}}
{{- if .Values.redis.externalUrl }}
{{- .Values.redis.externalUrl }}
{{- else if and .Values.redis.enabled (not .Values.redis.externalUrlSecret.name) }}
{{- printf "redis://%s:6379/0" (include "citadel.redis.fullname" .) }}
{{- end }}
{{- end }}

{{/* True ("true") when the bundled Redis runs. */}}
{{- define "citadel.redis.enabled" -}}
{{- if and .Values.redis.enabled .Values.gateway.enabled (not .Values.redis.externalUrl) (not .Values.redis.externalUrlSecret.name) }}true{{ end }}
{{- end }}

{{/* True when the Prometheus Operator's API is served (or given with --api-versions). */}}
{{- define "citadel.monitoring.enabled" -}}
{{- if and .Values.monitoring.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
The container security context of the "restricted" Pod Security Standard, with a
read-only root filesystem: Redis's, and the default of the operator's and the
gateway's securityContext values (values.yaml holds the same; see
citadel.securityContext).
*/}}
{{- define "citadel.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The default of the operator's and the gateway's podSecurityContext values
(values.yaml holds the same): the "restricted" standard, as the images' user.
*/}}
{{- define "citadel.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
A pod's or container's securityContext from a component's values, as YAML, empty
when there is nothing to set; call with (dict "values" .Values.gateway "key"
"podSecurityContext") or "securityContext". Without the key (or with it null,
which Helm removes), the defaults above: `helm upgrade --reuse-values` from a
chart older than these values renders with that chart's defaults, which lack
them, and rendering nothing would silently drop every protection. An explicit {}
sets nothing.
*/}}
{{- define "citadel.securityContext" -}}
{{- $given := get .values .key }}
{{- if kindIs "map" $given }}
{{- include "citadel.withoutNulls" $given }}
{{- else if eq .key "podSecurityContext" }}
{{- include "citadel.podSecurityContext" . }}
{{- else }}
{{- include "citadel.containerSecurityContext" . }}
{{- end }}
{{- end }}

{{/*
A map as YAML without its null fields, in nested maps too; empty when nothing is
left. Helm removes a value set to null only where the chart's values.yaml has
that key (runAsUser), not elsewhere (procMount: null), and toYaml would write
those out as null.
*/}}
{{- define "citadel.withoutNulls" -}}
{{- $kept := dict }}
{{- range $key, $value := . }}
{{- if kindIs "map" $value }}
{{- $_ := set $kept $key (include "citadel.withoutNulls" $value | fromYaml) }}
{{- else if not (kindIs "invalid" $value) }}
{{- $_ := set $kept $key $value }}
{{- end }}
{{- end }}
{{- with $kept }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/*
The bootstrap admin key: the one already stored in the cluster when there is one
(so upgrades keep it), otherwise a new one. Computed once per render and cached on
the root context, so the plain-key Secret and the hashed record agree.
*/}}
{{- define "citadel.adminKey" -}}
{{- if not (hasKey $ "citadelAdminKey") }}
{{- $name := printf "%s-admin-key" (include "citadel.fullname" .) }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name }}
{{- $key := "" }}
{{- if and $existing $existing.data (hasKey $existing.data "key") }}
{{- $key = index $existing.data "key" | b64dec }}
{{- else }}
{{- $key = printf "ctd-%s" (randAlphaNum 43) }}
{{- end }}
{{- $_ := set $ "citadelAdminKey" $key }}
{{- end }}
{{- get $ "citadelAdminKey" }}
{{- end }}

{{/*
The admin key's SHA-256 as its record stores it ("sha256:<hex>"): the hash given in
gateway.adminKey.sha256 when the key is the user's (existingSecret: no lookup and
no generated key, so `helm template` and Argo CD render the same record every
time), else the hash of the generated key. The record's template checks the values
first (citadel.adminKey.check).
*/}}
{{- define "citadel.adminKey.hash" -}}
{{- if .Values.gateway.adminKey.existingSecret }}
{{- printf "sha256:%s" .Values.gateway.adminKey.sha256 }}
{{- else }}
{{- printf "sha256:%s" (include "citadel.adminKey" . | sha256sum) }}
{{- end }}
{{- end }}

{{/*
Refuses admin-key values that do not go together. The schema checks each value's
form; only a template can check them against one another.
*/}}
{{- define "citadel.adminKey.check" -}}
{{- with .Values.gateway.adminKey }}
{{- if .existingSecret }}
{{- if not .create }}
{{- fail "gateway.adminKey.existingSecret is set but gateway.adminKey.create is false: set create=true for the chart to store that key's record, or unset existingSecret" }}
{{- end }}
{{- if not .sha256 }}
{{- fail (printf "gateway.adminKey.existingSecret needs gateway.adminKey.sha256, the SHA-256 of the key in Secret %s (key %s), as 64 lowercase hex digits: printf %%s \"$KEY\" | sha256sum" .existingSecret .existingSecretKey) }}
{{- end }}
{{- else if .sha256 }}
{{- fail "gateway.adminKey.sha256 is set without gateway.adminKey.existingSecret: name the Secret holding the key, or unset sha256 for a generated key" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret holding the plain admin key: the user's, or the generated one. */}}
{{- define "citadel.adminKey.secretName" -}}
{{- .Values.gateway.adminKey.existingSecret | default (printf "%s-admin-key" (include "citadel.fullname" .)) }}
{{- end }}

{{/* The key of that Secret's data holding the admin key. */}}
{{- define "citadel.adminKey.secretKey" -}}
{{- if .Values.gateway.adminKey.existingSecret }}
{{- .Values.gateway.adminKey.existingSecretKey }}
{{- else -}}
key
{{- end }}
{{- end }}

{{/* The name of the Kopf peering object the operator replicas share. */}}
{{- define "citadel.operator.peeringName" -}}
{{ include "citadel.operator.fullname" . }}-{{ .Release.Namespace }}
{{- end }}

{{/*
What the operator does to the objects of the namespaces holding models: LLMModels
and what it makes for each (Deployment, Service, cache PVC, PodDisruptionBudget,
PodMonitor), the pods it reads to explain a model's status, and Events. Used by the ClusterRole (cluster-wide) or by one Role per namespace.
*/}}
{{- define "citadel.operator.modelRules" -}}
# Only the verbs the operator sends: it applies (patch), creates claims and
# Events (create), deletes what it owns, and watches models, Deployments and pods
# (Kopf's indexes) and its Services (to make one deleted by hand again at once);
# it never updates (PUT).
- apiGroups: [citadel.ai]
  resources: [llmmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [citadel.ai]
  resources: [llmmodels/status]
  verbs: [get, patch]
# The autoscaler sizes a model with `spec.autoscaling` as an HPA would: through
# the scale subresource.
- apiGroups: [citadel.ai]
  resources: [llmmodels/scale]
  verbs: [get, patch]
# It leaves a model that an HPA sizes too to the HPA, and says so: it lists
# HPAs (read only) to know.
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [list]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: [citadel.ai]
  resources: [llmmodels/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, create, patch, delete]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/*
The namespace of the routing ConfigMap when it is not the release's: empty unless
gateway.routesNamespace names another one, which only a gateway beside another
release's operator may do (this release's operator writes into its own).
*/}}
{{/*
The namespace of the API-key Secrets: gateway.keysNamespace, else the release's.
*/}}
{{- define "citadel.gateway.keysNamespace" -}}
{{- default .Release.Namespace .Values.gateway.keysNamespace }}
{{- end }}

{{/*
The gateway's CITADEL_GATEWAY_ROUTES_NAMESPACE: another release's namespace
(gateway.routesNamespace), or the release's own when the keys (its
CITADEL_GATEWAY_NAMESPACE) are elsewhere; empty when it is the keys' namespace.
*/}}
{{- define "citadel.gateway.routesNamespaceEnv" -}}
{{- $other := include "citadel.gateway.routesNamespace" . }}
{{- if $other }}
{{- $other }}
{{- else if ne (include "citadel.gateway.keysNamespace" .) .Release.Namespace }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{- define "citadel.gateway.routesNamespace" -}}
{{- $ns := .Values.gateway.routesNamespace }}
{{- if and $ns (ne $ns .Release.Namespace) }}
{{- if .Values.operator.enabled }}
{{- fail "gateway.routesNamespace is for operator.enabled=false: this release's operator writes the routing ConfigMap into the release namespace" }}
{{- end }}
{{- $ns }}
{{- end }}
{{- end }}

{{/*
A value the programs cannot start without, by its dotted path; call with
(list $ "gateway.metricsPort"). `helm upgrade --reuse-values` renders this chart
with the defaults of the chart the release was installed with, so a key added
since is missing: a clear failure here beats pods that crash on an empty
variable.
*/}}
{{- define "citadel.requiredValue" -}}
{{- $path := index . 1 }}
{{- $node := (index . 0).Values }}
{{- $found := true }}
{{- range $key := splitList "." $path }}
{{- if and $found (kindIs "map" $node) (hasKey $node $key) }}
{{- $node = index $node $key }}
{{- else }}
{{- $found = false }}
{{- end }}
{{- end }}
{{- if or (not $found) (kindIs "invalid" $node) }}
{{- fail (printf "%s is not set: with `helm upgrade --reuse-values` Helm keeps the defaults of the chart the release was installed with, and this key is newer; upgrade with --reset-then-reuse-values (Helm 3.14+) or a full values file (docs/install.md, Upgrade)" $path) }}
{{- end }}
{{- $node }}
{{- end }}

{{/*
The name of the admin key's record: `citadel-key-admin`, the Secret
`citadel keys create admin` would make, in the release namespace. In another
namespace (gateway.keysNamespace), which other releases may share, it carries
the release namespace after a dot, the form `citadel keys rotate` gives a key's
further Secrets: no key name holds a dot, so it is never the Secret `create`
makes for another key. The gateway and `citadel keys` find records by label and
by the name inside, never by the Secret's name.
*/}}
{{- define "citadel.adminKey.recordName" -}}
citadel-key-admin
{{- if ne (include "citadel.gateway.keysNamespace" .) .Release.Namespace }}.{{ .Release.Namespace }}{{ end }}
{{- end }}

{{/*
Fails the install when another release already runs a cluster-wide operator. Each
release's operator peers only with its own replicas (the peering object is named
after the release), so two cluster-wide operators would both act on every model:
with two chart versions they would rewrite each other's Deployments for ever. Seen
through that release's ClusterKopfPeering, which the chart labels; `lookup` finds
nothing under `helm template`, `--dry-run` (client) or Argo CD, which therefore
cannot check. Without Kopf's API (no CRDs yet: a first `helm install
--dry-run=server`, as Helm installs crds/ only for a real install) no operator
runs, and a lookup of an API the cluster does not serve fails the render.
*/}}
{{- define "citadel.operator.aloneClusterWide" -}}
{{- if .Capabilities.APIVersions.Has "kopf.dev/v1/ClusterKopfPeering" }}
{{- $found := lookup "kopf.dev/v1" "ClusterKopfPeering" "" "" }}
{{- range $peering := ($found.items | default list) }}
{{- $meta := $peering.metadata }}
{{- $labels := $meta.labels | default dict }}
{{- $notes := $meta.annotations | default dict }}
{{- $release := get $notes "meta.helm.sh/release-name" }}
{{- $releaseNs := get $notes "meta.helm.sh/release-namespace" }}
{{- if and (eq (get $labels "app.kubernetes.io/part-of") "citadel") (eq (get $labels "app.kubernetes.io/component") "operator") (not (and (eq $release $.Release.Name) (eq $releaseNs $.Release.Namespace))) }}
{{- /* Applied without Helm (`helm template | kubectl apply`, Argo CD), it has
no Helm annotations: the release is its instance label, the namespace unknown. */}}
{{- $who := printf "%s/%s" $releaseNs $release }}
{{- $routes := $releaseNs }}
{{- if not (and $release $releaseNs) }}
{{- $who = printf "%s (namespace unknown)" ($release | default (get $labels "app.kubernetes.io/instance") | default "unknown") }}
{{- $routes = "<the operator's release namespace>" }}
{{- end }}
{{- fail (printf "release %s already runs a cluster-wide Citadel operator (ClusterKopfPeering %s): two would both act on every model. Install this release with operator.enabled=false and gateway.routesNamespace=%s (a gateway of its own beside that operator; docs/install.md), or uninstall that release first" $who $meta.name $routes) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fails the render when the values are of another layout than this chart's (see
valuesLayout in values.yaml): `helm upgrade --reuse-values` keeps the values of the
chart the release was installed with, and every key added since would be missing,
some silently (a security context rendered with only the field set beside it).
Raise the number with every chart version that adds or moves a key.
*/}}
{{- define "citadel.valuesLayout" -}}3{{- end }}
{{- define "citadel.checkValuesLayout" -}}
{{- $own := include "citadel.valuesLayout" . }}
{{- $given := .Values.valuesLayout }}
{{- if or (kindIs "invalid" $given) (ne (toString $given) $own) }}
{{- fail (printf "valuesLayout is %s where this chart's is %s: with `helm upgrade --reuse-values` Helm keeps the values of the chart the release was installed with, and the keys added since would be missing; upgrade with --reset-then-reuse-values (Helm 3.14+) or a full values file made for this chart (docs/install.md, Upgrade)" (ternary "not set" (toString $given) (kindIs "invalid" $given)) $own) }}
{{- end }}
{{- end }}
