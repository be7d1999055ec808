module github.com/docker-flow-proxy/docker-flow-proxy

go 1.26.8
