{{/* Labels shared by every object of the release. */}}
{{- define "clustermesh.labels" -}}
app.kubernetes.io/part-of: clustermesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
clustermesh.io/cluster: {{ .Values.cluster.name | quote }}
{{- end -}}

{{/* Image tag: the configured one or the chart's appVersion. */}}
{{- define "clustermesh.tag" -}}
{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Pod template of the mesh API server, shared by its Deployment and StatefulSet. */}}
{{- define "clustermesh.apiserverPod" -}}
metadata:
  labels:
    {{- include "clustermesh.labels" . | nindent 4 }}
    app.kubernetes.io/name: clustermesh-apiserver
spec:
  serviceAccountName: clustermesh-apiserver
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    runAsGroup: 65532
    fsGroup: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: apiserver
      image: "{{ .Values.image.prefix }}/clustermesh-apiserver:{{ include "clustermesh.tag" . }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --cluster-name={{ .Values.cluster.name }}
        - --cluster-id={{ .Values.cluster.id }}
        - --max-connected-clusters={{ .Values.cluster.maxConnectedClusters }}
        - --trust-domain={{ .Values.trustDomain }}
        - --source=kubernetes
        - --listen=0.0.0.0:{{ .Values.apiserver.grpcPort }}
        - --metrics-addr=0.0.0.0:{{ .Values.apiserver.metricsPort }}
        - --tls-dir=/etc/clustermesh/tls
        - --log-format={{ .Values.apiserver.logFormat }}
        - "--export-pods={{ .Values.apiserver.exportPods }}"
        {{- if eq .Values.mode "mirror" }}
        {{- /* The connected clusters, as `clustermesh connect` keeps them in the agent
               configuration (same file, same CA files). */}}
        - --mirror-peers=/etc/clustermesh/agent/agent.yaml
        {{- end }}
        - --store={{ .Values.apiserver.store.type }}
        {{- if eq .Values.apiserver.store.type "raft" }}
        - --raft-data-dir=/var/lib/clustermesh
        - --raft-listen=0.0.0.0:{{ .Values.apiserver.raftPort }}
        {{- if gt (int .Values.apiserver.replicas) 1 }}
        {{- /* Raft IDs are the StatefulSet pod indexes; each replica presents its own
               replica certificate (spiffe://<td>/cluster/<name>/replica/<id>). */}}
        - --raft-id=$(POD_INDEX)
        - --replica-cert=/etc/clustermesh/replica/replica-$(POD_INDEX).crt
        - --replica-key=/etc/clustermesh/replica/replica-$(POD_INDEX).key
        {{- $ns := .Release.Namespace }}
        {{- $port := .Values.apiserver.raftPort }}
        {{- range $i := until (int .Values.apiserver.replicas) }}
        - --raft-peer={{ $i }}=clustermesh-apiserver-{{ $i }}.clustermesh-apiserver-peers.{{ $ns }}.svc:{{ $port }}
        {{- end }}
        {{- else }}
        - --replica-cert=/etc/clustermesh/replica/replica-1.crt
        - --replica-key=/etc/clustermesh/replica/replica-1.key
        {{- end }}
        {{- else }}
        - --etcd-endpoints={{ .Values.apiserver.store.etcd.endpoints }}
        {{- if .Values.apiserver.store.etcd.tlsSecret }}
        - --etcd-ca=/etc/clustermesh/etcd-tls/ca.crt
        - --etcd-cert=/etc/clustermesh/etcd-tls/tls.crt
        - --etcd-key=/etc/clustermesh/etcd-tls/tls.key
        {{- end }}
        {{- end }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- if and (eq .Values.apiserver.store.type "raft") (gt (int .Values.apiserver.replicas) 1) }}
        - name: POD_INDEX
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ .Values.apiserver.grpcPort }}
          protocol: TCP
        - name: raft
          containerPort: {{ .Values.apiserver.raftPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ .Values.apiserver.metricsPort }}
          protocol: TCP
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: 5
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: 10
        failureThreshold: 6
      resources:
        {{- toYaml .Values.apiserver.resources | nindent 8 }}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - name: tls
          mountPath: /etc/clustermesh/tls
          readOnly: true
        - name: data
          mountPath: /var/lib/clustermesh
        {{- if eq .Values.mode "mirror" }}
        - name: mesh-config
          mountPath: /etc/clustermesh/agent
          readOnly: true
        {{- end }}
        {{- if eq .Values.apiserver.store.type "raft" }}
        - name: replica
          mountPath: /etc/clustermesh/replica
          readOnly: true
        {{- end }}
        {{- if .Values.apiserver.store.etcd.tlsSecret }}
        - name: etcd-tls
          mountPath: /etc/clustermesh/etcd-tls
          readOnly: true
        {{- end }}
  nodeSelector:
    {{- toYaml .Values.apiserver.nodeSelector | nindent 4 }}
  tolerations:
    {{- toYaml .Values.apiserver.tolerations | nindent 4 }}
  volumes:
    - name: tls
      projected:
        sources:
          - secret:
              name: {{ .Values.tls.serverSecret }}
              items:
                - key: tls.crt
                  path: server.crt
                - key: tls.key
                  path: server.key
          # Trusted CAs: this cluster's plus every connected cluster's (clustermesh connect),
          # each labelled with the one cluster whose identities it may issue.
          - secret:
              name: {{ .Values.tls.caBundleSecret }}
              items:
                - key: ca-bundle.crt
                  path: ca.crt
    {{- if eq .Values.mode "mirror" }}
    # The connected clusters to mirror and their CAs (the agents' configuration).
    - name: mesh-config
      configMap:
        name: clustermesh-agent-config
    {{- end }}
    {{- if eq .Values.apiserver.store.type "raft" }}
    # Store replica certificates (replica-<id>.crt/.key): only the raft port accepts them.
    - name: replica
      secret:
        secretName: {{ .Values.tls.replicaSecret }}
    {{- end }}
    {{- if not (and (eq .Values.apiserver.store.type "raft") (gt (int .Values.apiserver.replicas) 1) .Values.apiserver.store.raft.persistence.enabled) }}
    - name: data
      emptyDir: {}
    {{- end }}
    {{- if .Values.apiserver.store.etcd.tlsSecret }}
    - name: etcd-tls
      secret:
        secretName: {{ .Values.apiserver.store.etcd.tlsSecret }}
    {{- end }}
{{- end -}}
