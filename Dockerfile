# mmdit-server image: a build stage that compiles the CPU build on Debian 12, and a slim runtime
# stage with only the shared libraries the binaries load.
#   docker build -t mmdit-serve .
#   docker run --rm -p 8001:8001 -p 8002:8002 mmdit-serve
#   docker run --rm -p 8001:8001 -p 8002:8002 -v $PWD/models:/models mmdit-serve \
#     mmdit-server --model_repository=/models
# The CUDA build needs the CUDA toolkit in the build stage and the NVIDIA container runtime; this
# image is the CPU build, which serves on CPU workers.

FROM debian:12 AS build
WORKDIR /src
COPY deploy/install-deps.sh deploy/install-deps.sh
RUN deploy/install-deps.sh && rm -rf /var/lib/apt/lists/*
# Only the sources: local build folders in the context would carry a foreign CMakeCache.
COPY CMakeLists.txt CMakePresets.json ./
COPY proto proto
COPY kernels kernels
COPY server server
COPY client client
COPY tools tools
COPY tests tests
RUN cmake --preset cpu -DBUILD_TESTING=OFF \
 && cmake --build build-cpu --target mmdit-server mmdit-run mmdit-client mmdit-loadgen

FROM debian:12
COPY deploy/install-deps.sh /tmp/install-deps.sh
RUN /tmp/install-deps.sh --runtime && rm -rf /var/lib/apt/lists/* /tmp/install-deps.sh \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mmdit
COPY --from=build /src/build-cpu/server/mmdit-server /src/build-cpu/server/mmdit-run \
                  /src/build-cpu/client/mmdit-client /src/build-cpu/client/mmdit-loadgen \
                  /usr/local/bin/
# Numeric, so that Kubernetes can check runAsNonRoot.
USER 10001
# 8001: gRPC (Open Inference Protocol); 8002: HTTP /metrics and /v2/health/*.
EXPOSE 8001 8002
CMD ["mmdit-server"]
