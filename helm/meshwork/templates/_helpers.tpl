{{/*
Shared helpers. Most take a dict: (dict "root" $ "svc" "users").
*/}}

{{/* The four services, in the order objects are rendered. */}}
{{- define "meshwork.serviceNames" -}}
users auth billing orders
{{- end }}

{{/* Who calls whom (caller: [callees]): the only service-to-service traffic allowed. Besides
     the business calls (auth -> users, orders -> users, orders -> billing), users, billing and
     orders fetch auth's public keys (GetJwks) to verify end users' access tokens. */}}
{{- define "meshwork.callGraph" -}}
users: [auth]
auth: [users]
billing: [auth]
orders: [users, billing, auth]
{{- end }}

{{/* The gRPC service each binary serves, for NOTES.txt. */}}
{{- define "meshwork.grpcServices" -}}
users: meshwork.users.v1.UserService
auth: meshwork.auth.v1.AuthService
billing: meshwork.billing.v1.BillingService
orders: meshwork.orders.v1.OrderService
{{- end }}

{{/* Prefix of every object name: at most 40 characters, so "<prefix>-billing-headless" stays a
DNS label (63). */}}
{{- define "meshwork.prefix" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- end }}

{{- define "meshwork.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{/* Labels on every object; (dict "root" $ "component" "users"). */}}
{{- define "meshwork.labels" -}}
helm.sh/chart: {{ include "meshwork.chart" .root }}
{{ include "meshwork.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: meshwork
{{- end }}

{{/* The labels a component's pods are selected by; (dict "root" $ "component" "users"). */}}
{{- define "meshwork.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* <repository>@<digest> or <repository>:<tag>; (dict "image" .Values.image "default" tag). */}}
{{- define "meshwork.imageRef" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .default }}
{{- end -}}
{{- end }}

{{/* The ServiceAccount of a service is named after it: it is the service's SPIFFE identity. */}}
{{- define "meshwork.serviceAccountName" -}}
{{ .svc }}
{{- end }}

{{- define "meshwork.spiffeId" -}}
spiffe://{{ .root.Values.trustDomain }}/ns/{{ .root.Release.Namespace }}/sa/{{ .sa }}
{{- end }}

{{- define "meshwork.tlsSecretName" -}}
{{- $explicit := "" -}}
{{- if eq .root.Values.tls.mode "secrets" -}}
{{- $explicit = index .root.Values.tls.secrets .svc -}}
{{- end -}}
{{- $explicit | default (printf "%s-%s-tls" (include "meshwork.prefix" .root) .svc) -}}
{{- end }}

{{/* dns://<prefix>-<svc>-headless.<namespace>.svc.<clusterDomain>:<mesh port>: the client
     re-resolves the headless Service (one address per ready pod) and balances across them. */}}
{{- define "meshwork.endpoint" -}}
dns://{{ include "meshwork.prefix" .root }}-{{ .svc }}-headless.{{ .root.Release.Namespace }}.svc.{{ .root.Values.clusterDomain }}:{{ .root.Values.ports.mesh }}
{{- end }}

{{/* The DNS names a service's certificate carries (besides its SPIFFE URI). */}}
{{- define "meshwork.dnsNames" -}}
{{- $name := printf "%s-%s" (include "meshwork.prefix" .root) .svc -}}
{{- $ns := .root.Release.Namespace -}}
{{- $domain := .root.Values.clusterDomain -}}
- {{ $name }}
- {{ $name }}.{{ $ns }}
- {{ $name }}.{{ $ns }}.svc
- {{ $name }}.{{ $ns }}.svc.{{ $domain }}
- {{ $name }}-headless.{{ $ns }}.svc
- {{ $name }}-headless.{{ $ns }}.svc.{{ $domain }}
{{- end }}

{{/* A service's config.toml: exactly the keys the service accepts (unknown keys stop it). */}}
{{- define "meshwork.configToml" -}}
{{- $root := .root -}}
{{- $graph := include "meshwork.callGraph" $root | fromYaml -}}
[server]
listen_addr = "0.0.0.0:{{ $root.Values.ports.mesh }}"

[admin]
listen_addr = "0.0.0.0:{{ $root.Values.ports.admin }}"

[tls]
cert_file = "/var/run/meshwork/tls/tls.crt"
key_file = "/var/run/meshwork/tls/tls.key"
ca_file = "/var/run/meshwork/tls/ca.crt"
trust_domain = {{ $root.Values.trustDomain | quote }}
{{- if eq $root.Values.database.mode "sqlite" }}

[database]
url = "sqlite:///var/lib/meshwork/{{ .svc }}.db"
{{- end }}
{{- range $callee := index $graph .svc }}

[{{ $callee }}]
endpoints = [{{ include "meshwork.endpoint" (dict "root" $root "svc" $callee) | quote }}]
{{- end }}
{{ end }}

{{/* Replicas the service can run at once (its HPA's maximum when autoscaling). */}}
{{- define "meshwork.maxReplicas" -}}
{{- if .cfg.autoscaling.enabled -}}
{{ .cfg.autoscaling.maxReplicas }}
{{- else -}}
{{ .cfg.replicas }}
{{- end -}}
{{- end }}

{{/*
Checks across keys that values.schema.json cannot express clearly; each failure names the keys
and says what to do.
*/}}
{{- define "meshwork.validate" -}}
{{- $v := .Values -}}
{{- if eq (int $v.ports.mesh) (int $v.ports.admin) -}}
{{- fail (printf "ports.mesh and ports.admin must differ (both are %v): the mesh port speaks mutual TLS only, the admin port plaintext" $v.ports.mesh) -}}
{{- end -}}
{{- if and (eq $v.tls.mode "certManager") (not $v.tls.certManager.issuerRef.name) -}}
{{- fail "tls.mode=certManager needs tls.certManager.issuerRef.name: the cert-manager Issuer or ClusterIssuer that signs the mesh certificates" -}}
{{- end -}}
{{- range $svc := splitList " " (include "meshwork.serviceNames" .) -}}
{{- $cfg := index $v.services $svc -}}
{{- if and $cfg.autoscaling.enabled (gt (int $cfg.autoscaling.minReplicas) (int $cfg.autoscaling.maxReplicas)) -}}
{{- fail (printf "services.%s.autoscaling.minReplicas (%v) is greater than maxReplicas (%v)" $svc $cfg.autoscaling.minReplicas $cfg.autoscaling.maxReplicas) -}}
{{- end -}}
{{- if eq $v.database.mode "sqlite" -}}
{{- if gt (int (include "meshwork.maxReplicas" (dict "cfg" $cfg))) 1 -}}
{{- fail (printf "services.%s: more than one replica (replicas or autoscaling.maxReplicas) needs database.mode=postgres; with database.mode=sqlite every pod has its own database file" $svc) -}}
{{- end -}}
{{- else -}}
{{- $pg := index $v.database.postgres $svc -}}
{{- if not $pg.secretName -}}
{{- fail (printf "database.mode=postgres needs database.postgres.%s.secretName: the Secret whose key %q holds the %s service's postgres:// URL" $svc $pg.key $svc) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if $v.networkPolicy.enabled -}}
{{- if and (eq $v.database.mode "postgres") (not $v.networkPolicy.postgres.to) -}}
{{- fail "database.mode=postgres with networkPolicy.enabled needs networkPolicy.postgres.to: the peers (podSelector/namespaceSelector/ipBlock) of your PostgreSQL server, or the services cannot reach it" -}}
{{- end -}}
{{- if and $v.telemetry.otlpEndpoint (not $v.networkPolicy.otlpCollector.to) -}}
{{- fail "telemetry.otlpEndpoint with networkPolicy.enabled needs networkPolicy.otlpCollector.to: the peers of your OpenTelemetry collector, or the services cannot export traces" -}}
{{- end -}}
{{- end -}}
{{- if le (int $v.terminationGracePeriodSeconds) (add (int $v.preStopSleepSeconds) 10) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds (%v) plus the services' 10 s drain, or the kubelet kills them mid-drain" $v.terminationGracePeriodSeconds $v.preStopSleepSeconds) -}}
{{- end -}}
{{- end }}
