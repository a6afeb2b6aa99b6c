"""Packaging for clip_har: reads everything from settings.ini (nbdev 2.x layout)."""
from configparser import ConfigParser
import setuptools, shlex

config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

licenses = {'apache2': 'Apache-2.0'}  # SPDX expressions (license classifiers are deprecated)
statuses = ['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
lic = licenses[cfg['license']]

def reqs(key):
    "The requirement list stored under `key` in settings.ini."
    return shlex.split(cfg.get(key, ''))

# Every `<name>_requirements` key becomes the pip extra `<name>`; `all` is their union.
extras = {k[:-len('_requirements')]: reqs(k) for k in cfg if k.endswith('_requirements')}
extras['all'] = sorted({r for k, v in extras.items() if k != 'dev' for r in v})
extras['dev'] = sorted(set(extras['dev']) | set(extras['all']))

setuptools.setup(
    name=cfg['lib_name'], version=cfg['version'], license_expression=lic,
    classifiers=['Development Status :: ' + statuses[int(cfg['status'])],
                 'Intended Audience :: ' + cfg['audience'].title(),
                 'Natural Language :: ' + cfg['language'].title(),
                 'Programming Language :: Python :: 3'],
    url=cfg['git_url'], packages=setuptools.find_namespace_packages(include=['clip_har', 'clip_har.*'], exclude=['*.__pycache__']),
    include_package_data=True, install_requires=reqs('requirements'), extras_require=extras,
    python_requires='>=' + cfg['min_python'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': reqs('console_scripts'), 'nbdev': [f'{cfg["lib_path"]}={cfg["lib_path"]}._modidx:d']},
    package_data={'clip_har': ['assets/*']},
    author=cfg['author'], author_email=cfg['author_email'], description=cfg['description'],
    keywords=cfg['keywords'])
