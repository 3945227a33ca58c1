"""Renders a Kubernetes Indexed Job (plus its headless Service) that runs `train.py` on N hosts.

    python launch/k8s.py --name=dense-1b --image=REGISTRY/sparse_lm:TAG --accelerator=tpu \\
        --tpu_type=tpu-v5-lite-podslice --tpu_topology=4x4 --hosts=4 --chips_per_host=4 \\
        -- --config=configs/dense_1b.py --workdir=gs://BUCKET/dense-1b | kubectl apply -f -

Pod `i` of the Job is JAX process `i` (its completion index). The headless Service gives pod 0 the
stable name `NAME-0.NAME`, the coordinator every process dials (`JAX_COORDINATOR_ADDRESS`);
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` complete what `train.py` reads. `--accelerator=tpu` asks for
a GKE TPU slice node pool (`cloud.google.com/gke-tpu-*` node selectors, `google.com/tpu` chips);
`gpu` for `nvidia.com/gpu`. `backoffLimit: 0`: one failed pod fails the Job, and Kubernetes stops the
others, instead of restarting that pod alone into a job the others have left. Kubernetes sends SIGTERM
before it evicts a pod, which checkpoints; re-applying the manifest resumes.
"""

import argparse
import sys

import yaml

COORDINATOR_PORT = 8476


def manifest(args, train_flags: list[str]) -> list[dict]:
  labels = {'app': args.name}
  env = [
      {'name': 'JAX_COORDINATOR_ADDRESS', 'value': f'{args.name}-0.{args.name}:{COORDINATOR_PORT}'},
      {'name': 'JAX_NUM_PROCESSES', 'value': str(args.hosts)},
      {'name': 'JAX_PROCESS_ID', 'valueFrom': {'fieldRef': {
          'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
  ]
  if args.accelerator == 'tpu':
    resources = {'google.com/tpu': args.chips_per_host}
    node_selector = {'cloud.google.com/gke-tpu-accelerator': args.tpu_type,
                     'cloud.google.com/gke-tpu-topology': args.tpu_topology}
  else:
    resources = {'nvidia.com/gpu': args.chips_per_host}
    node_selector = {}
  container = {
      'name': 'train',
      'image': args.image,
      'command': ['python', 'train.py', '--distributed=on', *train_flags],
      'env': env,
      'ports': [{'containerPort': COORDINATOR_PORT}],
      'resources': {'limits': resources, 'requests': resources},
  }
  service = {
      'apiVersion': 'v1', 'kind': 'Service',
      'metadata': {'name': args.name},
      'spec': {'clusterIP': 'None', 'selector': labels,
               'ports': [{'port': COORDINATOR_PORT, 'name': 'coordinator'}]},
  }
  job = {
      'apiVersion': 'batch/v1', 'kind': 'Job',
      'metadata': {'name': args.name},
      'spec': {
          'completionMode': 'Indexed',
          'completions': args.hosts,
          'parallelism': args.hosts,
          'backoffLimit': 0,
          'template': {
              'metadata': {'labels': labels},
              'spec': {
                  'subdomain': args.name,  # pods resolve as NAME-INDEX.NAME through the Service
                  'restartPolicy': 'Never',
                  'terminationGracePeriodSeconds': args.grace_seconds,
                  'nodeSelector': node_selector,
                  'containers': [container],
              },
          },
      },
  }
  return [service, job]


def parse(argv: list[str]):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                   usage='%(prog)s [options] -- TRAIN_FLAGS...')
  parser.add_argument('--name', required=True, help='Job and Service name (DNS label)')
  parser.add_argument('--image', required=True, help='a container image with this repo installed')
  parser.add_argument('--accelerator', choices=('tpu', 'gpu'), default='tpu')
  parser.add_argument('--hosts', type=int, required=True, help='pods, one JAX process each')
  parser.add_argument('--chips_per_host', type=int, default=4)
  parser.add_argument('--tpu_type', default='tpu-v5-lite-podslice')
  parser.add_argument('--tpu_topology', default='4x4')
  parser.add_argument('--grace_seconds', type=int, default=300,
                      help='time between SIGTERM and SIGKILL: enough to write a checkpoint')
  split = argv.index('--') if '--' in argv else len(argv)
  args = parser.parse_args(argv[:split])
  for name, low in (('hosts', 1), ('chips_per_host', 1), ('grace_seconds', 0)):
    if getattr(args, name) < low:
      parser.error(f'--{name}={getattr(args, name)} must be at least {low}')
  return args, argv[split + 1:]


def main() -> None:
  args, train_flags = parse(sys.argv[1:])
  yaml.safe_dump_all(manifest(args, train_flags), sys.stdout, sort_keys=False)


if __name__ == '__main__':
  main()
