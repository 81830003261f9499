{{/* NetworkPolicy rules. Each rule is preceded by a comment naming the edge it allows. */}}

{{/* Ingress rules of a service's policy; (dict "root" $ "svc" "users" "graph" callGraph). */}}
{{- define "meshwork.serviceIngress" -}}
{{- $root := .root -}}
{{- $svc := .svc -}}
{{- $np := $root.Values.networkPolicy -}}
{{- range $caller := splitList " " (include "meshwork.serviceNames" $root) }}
{{- if has $svc (index $.graph $caller) }}
# {{ $caller }} -> {{ $svc }}
- from:
    - podSelector:
        matchLabels:
          {{- include "meshwork.selectorLabels" (dict "root" $root "component" $caller) | nindent 10 }}
  ports:
    - protocol: TCP
      port: {{ $root.Values.ports.mesh }}
{{- end }}
{{- end }}
{{- with $np.operator.from }}
# the operator -> {{ $svc }}
- from:
    {{- toYaml . | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ $root.Values.ports.mesh }}
{{- end }}
{{- if $root.Values.tests.enabled }}
# `helm test` -> {{ $svc }} (health, admin port)
- from:
    - podSelector:
        matchLabels:
          {{- include "meshwork.selectorLabels" (dict "root" $root "component" "health-test") | nindent 10 }}
  ports:
    - protocol: TCP
      port: {{ $root.Values.ports.admin }}
{{- end }}
{{- if $root.Values.telemetry.serviceMonitor.enabled }}
{{- with $np.metricsScraper.from }}
# Prometheus -> {{ $svc }} (/metrics, admin port)
- from:
    {{- toYaml . | nindent 4 }}
  ports:
    - protocol: TCP
      port: {{ $root.Values.ports.admin }}
{{- end }}
{{- end }}
{{- end }}

{{/* Egress rules of a service's policy; (dict "root" $ "svc" "users" "graph" callGraph). */}}
{{- define "meshwork.serviceEgress" -}}
{{- $root := .root -}}
{{- $np := $root.Values.networkPolicy -}}
{{- range $callee := index .graph .svc }}
# {{ $.svc }} -> {{ $callee }}
- to:
    - podSelector:
        matchLabels:
          {{- include "meshwork.selectorLabels" (dict "root" $root "component" $callee) | nindent 10 }}
  ports:
    - protocol: TCP
      port: {{ $root.Values.ports.mesh }}
{{- end }}
{{- include "meshwork.egressRule" (dict "comment" "DNS" "to" $np.dns.to "ports" $np.dns.ports "udp" true) }}
{{- if $root.Values.telemetry.otlpEndpoint }}
{{- include "meshwork.egressRule" (dict "comment" "the OTLP collector" "to" $np.otlpCollector.to "ports" $np.otlpCollector.ports) }}
{{- end }}
{{- if eq $root.Values.database.mode "postgres" }}
{{- include "meshwork.egressRule" (dict "comment" "PostgreSQL" "to" $np.postgres.to "ports" $np.postgres.ports) }}
{{- end }}
{{- end }}

{{/* An egress rule to configured peers, or nothing when none is configured (an empty `to`
would allow every destination). */}}
{{- define "meshwork.egressRule" -}}
{{- if .to }}
# {{ .comment }}
- to:
    {{- toYaml .to | nindent 4 }}
  ports:
    {{- range $port := .ports }}
    {{- if $.udp }}
    - protocol: UDP
      port: {{ $port }}
    {{- end }}
    - protocol: TCP
      port: {{ $port }}
    {{- end }}
{{- end }}
{{- end }}

{{/* `ingress:`/`egress:` with the given rules, or an explicit empty list (deny all). */}}
{{- define "meshwork.policyRules" -}}
{{- $rules := .rules | trim -}}
{{- if $rules -}}
{{ .key }}:
  {{- $rules | nindent 2 }}
{{- else -}}
{{ .key }}: []
{{- end -}}
{{- end }}
